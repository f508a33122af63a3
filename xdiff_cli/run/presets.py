"""Model-pair presets: `presets/*.toml`, each a pair of models plus the settings that suit them.

A preset file looks like:

    description = "one line for `xdiff presets`"
    hardware = "what it needs and how long it takes"

    [models]
    a = "meta-llama/Llama-3.1-8B-Instruct"
    b = "Qwen/Qwen3-8B"

    [settings]          # keys are `RunSettings` field names
    tokens = 100_000_000
    k = 200

Precedence when building a run's settings: RunSettings defaults < preset < explicit CLI
options. `xdiff run A B` picks a preset by itself when A and B match a preset's models in
the same order (a reversed pair is a different experiment: A-exclusive becomes B-exclusive).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xdiff_cli.errors import XdiffError
from xdiff_cli.run.settings import RunSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

_SETTING_FIELDS = {f.name for f in dataclasses.fields(RunSettings)} - {"model_a", "model_b"}


@dataclass(frozen=True)
class Preset:
    name: str
    model_a: str
    model_b: str
    settings: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    hardware: str = ""
    path: Path | None = None

    def matches(self, model_a: str, model_b: str) -> bool:
        """Same pair, same order; a pinned `@revision` on the command line still matches."""
        return _model_key(model_a) == _model_key(self.model_a) and _model_key(model_b) == _model_key(self.model_b)


def _model_key(spec: str) -> str:
    return spec.split("@", 1)[0].strip().rstrip("/").lower()


def presets_dir() -> Path:
    """`presets/` inside an installed wheel, else at the top of the source checkout."""
    import xdiff_cli

    package_dir = Path(xdiff_cli.__file__).parent
    bundled = package_dir / "presets"
    return bundled if bundled.is_dir() else package_dir.parent / "presets"


def parse_preset(path: Path) -> Preset:
    """Read and validate one preset file; a broken file names itself and the problem."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise XdiffError(f"preset file {path} cannot be read: {exc}") from exc
    models = data.get("models", {})
    if not isinstance(models, dict) or not models.get("a") or not models.get("b"):
        raise XdiffError(f"preset file {path} needs a [models] table with `a` and `b`")
    settings = data.get("settings", {})
    unknown = sorted(set(settings) - _SETTING_FIELDS)
    if unknown:
        raise XdiffError(f"preset file {path} sets unknown setting(s): {', '.join(unknown)}")
    preset = Preset(
        name=path.stem,
        model_a=str(models["a"]),
        model_b=str(models["b"]),
        settings=dict(settings),
        description=str(data.get("description", "")),
        hardware=str(data.get("hardware", "")),
        path=path,
    )
    # Fail on a bad value here, not halfway through a run.
    apply_preset(RunSettings(model_a=preset.model_a, model_b=preset.model_b), preset).validate()
    return preset


def list_presets(directory: Path | None = None) -> list[Preset]:
    directory = directory or presets_dir()
    if not directory.is_dir():
        return []
    return [parse_preset(p) for p in sorted(directory.glob("*.toml"))]


def load_preset(name: str, directory: Path | None = None) -> Preset:
    from xdiff_cli.paths import validate_id

    directory = directory or presets_dir()
    path = directory / f"{validate_id(name, 'preset name')}.toml"
    if not path.is_file():
        names = [p.stem for p in sorted(directory.glob("*.toml"))] if directory.is_dir() else []
        raise XdiffError(f"unknown preset {name!r}", f"choose one of: {', '.join(names) or '(none found)'}")
    return parse_preset(path)


def match_preset(model_a: str, model_b: str, directory: Path | None = None) -> Preset | None:
    """The preset whose models are exactly (model_a, model_b), in that order, if any."""
    for preset in list_presets(directory):
        if preset.matches(model_a, model_b):
            return preset
    return None


def apply_preset(settings: RunSettings, preset: Preset) -> RunSettings:
    """`settings` with the preset's values laid over them (models untouched)."""
    return dataclasses.replace(settings, **preset.settings)


def shipped_config_dir(spec: str) -> Path | None:
    """`presets/configs/org--name/`: the config facts shipped for a preset's model, so planning
    a preset pair works offline (see presets/configs/README.md). None for other models."""
    repo = _model_key(spec)
    if repo.count("/") != 1:
        return None
    configs = presets_dir() / "configs"
    if not configs.is_dir():
        return None
    for folder in configs.iterdir():
        if folder.name.lower() == repo.replace("/", "--") and (folder / "config.json").is_file():
            return folder
    return None
