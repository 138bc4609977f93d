"""One config model per stage, and the plumbing every stage command shares.

Each stage declares its options once, as a `StageConfig` (pydantic: unknown keys and non-finite numbers
refused). Its CLI command builds its flags from that model (`flag`: help text and default come from the field),
its pipeline section is that model, and its Python function takes it. A command resolves YAML < flags
(`resolve`), and `--dry-run` prints the result (`dump`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

from okdpipe.errors import OkdpipeError
from okdpipe.files import recorded_path

C = TypeVar("C", bound="StageConfig")
# A folder or file the user names, kept absolute (files.recorded_path): records are read from other folders.
RecordedPath = Annotated[Optional[str], AfterValidator(recorded_path)]


class StageConfig(BaseModel):
    """Strict: a typo is an error, not a silently ignored key; NaN and inf are refused everywhere."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False, strict=True)


def resolve(cls: type[C], config_file: Path | None, flags: dict[str, Any]) -> C:
    """The stage config from a YAML file (optional) overridden by the flags the user gave (non-None)."""
    from okdpipe.config import read_yaml

    values = read_yaml(config_file) if config_file is not None else {}
    given = {key: value for key, value in flags.items() if value is not None}
    values.update(given)
    try:
        return cls(**values)
    except ValidationError as exc:
        raise OkdpipeError(problem_source(exc, given, config_file)) from None


def problem_source(error: ValidationError, flags: dict[str, Any], config_file: Path | None) -> str:
    """`--opset 5: Input should be ...` for a flag, `FILE: opset: ...` for a config file's key."""
    first = error.errors()[0]
    field = str(first["loc"][0]) if first["loc"] else ""
    message = first["msg"].removeprefix("Value error, ")
    if field in flags:
        return f"--{field.replace('_', '-')} {flags[field]}: {message}"
    where = ": ".join(str(part) for part in (config_file, field) if part) or "options"
    return f"{where}: {message}"


def resolve_or_show(cls: type[C], config_file: Path | None, flags: dict[str, Any], dry_run: bool) -> C | None:
    """`resolve`, then for `--dry-run` print the resolved config and return None (the command stops there)."""
    config = resolve(cls, config_file, flags)
    if not dry_run:
        return config
    show(config)
    return None


def show(config: BaseModel) -> None:
    """`--dry-run`'s output: the resolved config as YAML on stdout."""
    import typer

    typer.echo(dump(config), nl=False)


def dump(config: BaseModel) -> str:
    """The resolved config as the YAML a `--config` file would hold."""
    import yaml

    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def flag(cls: type[BaseModel], field: str, *decls: str, **kwargs: Any):
    """A typer option for `cls.field`: its description and default come from the model (so the flag's default
    is None, meaning "not given", and the model decides)."""
    import typer

    info = cls.model_fields[field]
    default = info.get_default(call_default_factory=True)
    shown = ",".join(map(str, default)) if isinstance(default, list) else default
    help_text = f"{(info.description or '').rstrip('.')}. [default: {shown}]"
    return typer.Option(*decls, help=help_text[0].upper() + help_text[1:], show_default=False, **kwargs)
