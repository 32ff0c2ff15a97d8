"""An OpenAI-compatible `POST /v1/images/edits` stand-in for tests, examples and benchmarks.

It is not AI: it returns the first input, resized, with a deterministic visible change in the
edit area. It shares no code with the rest of editbatch. See docs/sandbox.md.
"""

from pipeline.sandbox.app import create_app
from pipeline.sandbox.config import SandboxConfig
from pipeline.sandbox.server import SandboxServer, serve

__all__ = ["SandboxConfig", "SandboxServer", "create_app", "serve"]
