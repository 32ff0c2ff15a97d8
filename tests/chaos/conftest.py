"""The chaos suite uses the integration suite's real servers (Redis, PostgreSQL)."""

from tests.integration.conftest import postgres_server, redis_server, redis_url

__all__ = ["postgres_server", "redis_server", "redis_url"]
