"""Rebuild mistudio/resources/transformer_lens_models.json: TransformerLens's model names and their aliases.

SAELens records the model an SAE was trained on by TransformerLens's name (``gpt2-small``, ``mistral-7b``); the
table lets mistudio compare it with a Hub name (``mistralai/Mistral-7B-v0.1``) without importing transformer_lens
(10 s). ``tests/test_sae_provenance.py`` checks the table against the installed transformer_lens. Run from the repo
root, with transformer_lens installed (``pip install -e ".[sae]"``): ``python scripts/build_model_aliases.py``.
"""
import importlib.metadata
import json
from pathlib import Path

from transformer_lens.loading_from_pretrained import MODEL_ALIASES, OFFICIAL_MODEL_NAMES

OUT = Path(__file__).resolve().parents[1] / "mistudio" / "resources" / "transformer_lens_models.json"


def table() -> dict:
    """{"transformer_lens": version, "models": {official name: [aliases]}}, in TransformerLens's order."""
    return {"transformer_lens": importlib.metadata.version("transformer_lens"),
            "models": {name: list(MODEL_ALIASES.get(name, [])) for name in OFFICIAL_MODEL_NAMES}}


if __name__ == "__main__":
    OUT.write_text(json.dumps(table(), indent=0) + "\n", encoding="utf-8")
    print(f"wrote {OUT} ({OUT.stat().st_size:,} bytes)")
