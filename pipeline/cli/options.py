"""Options shared by several commands, declared once.

Typer reads a command's options from its signature. `shared(ManifestOptions)` adds every field
of the dataclass to the decorated command's signature as a keyword-only option, and hands the
command one `ManifestOptions` value instead, so `check`, `estimate`, `submit` and `run` declare
the dozen manifest options in one place.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar, get_type_hints

import typer

from pipeline.errors import ConfigError
from pipeline.intake.manifest import Defaults
from pipeline.settings import Settings

if TYPE_CHECKING:
    from pipeline.batch.submit import Intake

ManifestArg = Annotated[
    str,
    typer.Argument(
        help="Manifest: .csv (header row), .json (array) or .jsonl; a path or a URL "
        "(s3://bucket/key.csv)."
    ),
]
BatchArg = Annotated[int, typer.Argument(help="Batch id.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
BudgetOpt = Annotated[
    str | None, typer.Option("--budget", help="Stop (hold the batch) at this many USD.")
]
LocalOpt = Annotated[
    bool, typer.Option("--local", help="Run the jobs in this process instead of sending them.")
]
RouteOpt = Annotated[
    str,
    typer.Option(
        "--route",
        help="sync: one call per edit (minutes). batch: OpenAI's Batch API, half price, "
        "within 24 h (docs/batch-route.md).",
    ),
]


@dataclasses.dataclass(frozen=True)
class ManifestOptions:
    """How the rows of a manifest are read and checked (check, estimate, submit, run)."""

    model: Annotated[str | None, typer.Option(help="Model for rows that name none.")] = None
    provider: Annotated[
        str | None,
        typer.Option(
            help="Provider for rows that name none (default EDITBATCH_PROVIDER): openai, azure, "
            "or a [providers.NAME] of the TOML settings."
        ),
    ] = None
    size: Annotated[str | None, typer.Option(help="Size for rows that give none.")] = None
    quality: Annotated[str | None, typer.Option(help="Quality for rows that give none.")] = None
    n: Annotated[
        int | None, typer.Option("--n", help="Images per row, for rows that give none.")
    ] = None
    output_format: Annotated[
        str | None, typer.Option(help="png | webp | jpeg | gif | svg, for rows that give none.")
    ] = None
    input_fidelity: Annotated[
        str | None, typer.Option(help="input_fidelity for rows that give none.")
    ] = None
    background: Annotated[str | None, typer.Option(help="background for rows that give none.")] = (
        None
    )
    name_template: Annotated[
        str | None,
        typer.Option("--name-template", help="Output name template, e.g. {id}_{index}.{ext}"),
    ] = None
    mask_mode: Annotated[
        str | None, typer.Option(help="guide | strict, for rows that give none.")
    ] = None
    complexity: Annotated[
        str | None,
        typer.Option(help="low | medium | high (planning effort), for rows that give none."),
    ] = None
    frame_count: Annotated[
        int | None, typer.Option(help="GIF frames (2..16), for GIF rows that give none.")
    ] = None
    frame_duration_ms: Annotated[
        int | None, typer.Option(help="Milliseconds per GIF frame, for GIF rows that give none.")
    ] = None
    svg_model: Annotated[
        str | None, typer.Option(help="SVG author model (svg.model), for SVG rows that give none.")
    ] = None
    svg_effort: Annotated[
        str | None,
        typer.Option(help="SVG author's reasoning effort, for SVG rows that give none."),
    ] = None
    allow_root: Annotated[
        list[Path] | None,
        typer.Option("--allow-root", help="Extra folder input files may come from (repeatable)."),
    ] = None
    convert: Annotated[
        bool,
        typer.Option("--convert", help="Convert TIFF/BMP/... inputs to PNG instead of refusing."),
    ] = False
    allow_unknown_model: Annotated[
        bool, typer.Option("--allow-unknown-model", help="Accept models not in the catalogue.")
    ] = False
    model_map: Annotated[
        list[str] | None,
        typer.Option(
            "--model-map",
            help="OLD=NEW: rows of model OLD run on NEW instead (repeatable), e.g. "
            "gpt-image-1.5=gpt-image-2.5-sunburst.",
        ),
    ] = None

    def intake(self, settings: Settings) -> Intake:
        """How the manifest's rows are read and checked, for `pipeline.batch.submit.prepare`."""
        from pipeline.batch.submit import Intake  # imports Pillow: only when a command needs it

        return Intake(
            defaults=self.defaults(settings),
            allow_roots=tuple(self.allow_root or ()),
            convert=self.convert,
            allow_unknown_model=self.allow_unknown_model,
        )

    def defaults(self, settings: Settings) -> Defaults:
        """Batch-wide values for the fields a row leaves empty."""
        values = {
            "size": self.size,
            "quality": self.quality,
            "n": self.n,
            "output_format": self.output_format,
            "input_fidelity": self.input_fidelity,
            "background": self.background,
            "output": self.name_template,
            "mask_mode": self.mask_mode,
            "complexity": self.complexity,
            "frame_count": self.frame_count,
            "frame_duration_ms": self.frame_duration_ms,
            "svg_model": self.svg_model,
            "svg_effort": self.svg_effort,
        }
        return Defaults(
            model=self.model or settings.default_model,
            values={k: v for k, v in values.items() if v is not None},
            model_map=parse_model_map(self.model_map),
            provider=self.provider or settings.provider,
        )


@dataclasses.dataclass(frozen=True)
class BatchCliOptions:
    """What a person chooses for a new batch as a whole (submit, run)."""

    name: Annotated[str | None, typer.Option(help="Batch name (default: manifest name).")] = None
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="Output folder or URL (default ./outputs).")
    ] = None
    budget: BudgetOpt = None
    no_reuse: Annotated[
        bool,
        typer.Option(
            "--no-reuse",
            help="Buy every edit, even one already bought (same images, prompt, params).",
        ),
    ] = False
    strict: Annotated[bool, typer.Option(help="Refuse the whole manifest if any row is bad.")] = (
        False
    )
    route: RouteOpt = "sync"
    fallback: Annotated[
        str | None,
        typer.Option(
            "--fallback",
            help="Batch route: send the leftovers of an expired provider batch on this route "
            "(sync) instead of a later provider batch.",
        ),
    ] = None
    keep_provider_files: Annotated[
        bool,
        typer.Option(
            "--keep-provider-files",
            help="Batch route: keep the uploaded inputs and the provider's output files after "
            "collection (the provider deletes output files after 30 days).",
        ),
    ] = False

    @property
    def output_uri(self) -> str:
        return output_uri(self.output)


def output_uri(output: str | None) -> str:
    """The output location as stored: a URL as given, a folder as an absolute path."""
    target = output or "outputs"
    return target if "://" in target else str(Path(target).resolve())


def parse_model_map(items: list[str] | None) -> dict[str, str]:
    """`--model-map OLD=NEW` options as a mapping; ConfigError naming a malformed one."""
    mapping: dict[str, str] = {}
    for item in items or ():
        old, sep, new = (part.strip() for part in item.partition("="))
        if not sep or not old or not new:
            raise ConfigError(
                f"--model-map {item!r}: give OLD=NEW, e.g. gpt-image-1.5=gpt-image-2.5-sunburst"
            )
        if old in mapping and mapping[old] != new:
            raise ConfigError(f"--model-map maps {old} twice ({mapping[old]} and {new})")
        mapping[old] = new
    return mapping


def parse_budget(value: str | None, option: str = "--budget") -> Decimal | None:
    """A budget in USD from the command line; ConfigError naming the option if it is not one."""
    if value is None:
        return None
    try:
        budget = Decimal(value)
    except InvalidOperation as exc:
        raise ConfigError(f"{option} {value!r} is not a number of US dollars") from exc
    if not budget.is_finite() or budget < 0:
        raise ConfigError(f"{option} must be a number of US dollars, 0 or more (got {value!r})")
    return budget


F = TypeVar("F", bound=Callable[..., Any])


def shared(*groups: type[Any]) -> Callable[[F], F]:
    """Add every field of each dataclass in `groups` to the command as an option; the command
    gets one instance per group, in the parameter annotated with that dataclass."""

    def decorate(command: F) -> F:
        signature = inspect.signature(command, eval_str=True)
        own = dict(signature.parameters)
        targets: dict[type[Any], str] = {}
        for name, param in signature.parameters.items():
            if param.annotation in groups:
                targets[param.annotation] = name
                del own[name]
        missing = [g.__name__ for g in groups if g not in targets]
        if missing:
            raise TypeError(f"{command.__name__} needs a parameter of type {', '.join(missing)}")
        added: list[inspect.Parameter] = []
        fields_of: dict[type[Any], list[str]] = {}
        for group in groups:
            hints = get_type_hints(group, include_extras=True)
            fields_of[group] = []
            for f in dataclasses.fields(group):
                fields_of[group].append(f.name)
                added.append(
                    inspect.Parameter(
                        f.name,
                        inspect.Parameter.KEYWORD_ONLY,
                        default=f.default,
                        annotation=hints[f.name],
                    )
                )

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            for group, names in fields_of.items():
                kwargs[targets[group]] = group(**{n: kwargs.pop(n) for n in names})
            return command(**kwargs)

        params = [*own.values(), *added]
        wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        wrapper.__annotations__["return"] = signature.return_annotation
        del wrapper.__wrapped__  # typer must read the signature above, not the command's
        return wrapper  # type: ignore[return-value]

    return decorate
