"""Prepare tiny models for scripts/develop when no real model is configured."""

from __future__ import annotations

from pathlib import Path
import sys

from .tiny_gguf import write_tiny_gguf


def main(out: str) -> None:
    """Write config/sarai_models/{tiny.gguf,omni/} once."""
    root = Path(out)
    if not (root / "tiny.gguf").exists():
        write_tiny_gguf(root / "tiny.gguf")
    if not (root / "omni" / "spk_dict.pt").exists():
        from .tiny_omni import write_tiny_omni

        write_tiny_omni(root / "omni")
    if not (root / "mmproj.gguf").exists():
        from .tiny_mmproj import write_tiny_mmproj

        write_tiny_mmproj(root / "omni", root / "mmproj.gguf")
    print(
        f"[sarai] tiny models ready: gguf_model={root / 'tiny.gguf'} mmproj_model={root / 'mmproj.gguf'} "
        f"omni_model={root / 'omni'}"
    )


if __name__ == "__main__":
    main(sys.argv[1])
