"""The sentence-transformers module of an exported mongars-llm embedding adapter.

This file is copied verbatim into a sentence-transformers export as
``mongars_st.py`` (``modules.json`` names ``mongars_st.MongarsLLM2Vec``) and
must never import ``mongars_llm``: the folder loads where only
``sentence-transformers``, ``transformers`` and ``peft`` are installed::

    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer("/path/to/export", trust_remote_code=True)
    docs = model.encode(["The sky is blue."])                     # no instruction
    queries = model.encode_query(["What color is the sky?"])      # the trained instruction
    custom = model.encode(["..."], prompt="Retrieve passages that answer the question")

The module is the whole LLM2Vec pipeline in one step: it tokenises
``(instruction, text)`` inputs (the ``prompt`` sentence-transformers passes is
the instruction; ``[instruction, text]`` pairs are accepted too), runs the
decoder (causal or bidirectional) with the LoRA adapter and pools the text's
span. All of it is done by ``_mongars_llm2vec.py``, next to this file: the
export copies mongars-llm's LLM2Vec core (``mongars_llm/runtime/_llm2vec.py``)
there byte for byte, so the vectors are the runtime's. sentence-transformers'
own ``Normalize`` module follows when the adapter normalises.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

try:  # sentence-transformers >= 6
    from sentence_transformers.base.modules import InputModule
except ImportError:  # pragma: no cover - sentence-transformers 5
    from sentence_transformers.models import InputModule  # type: ignore[no-redef]

__all__ = ["CONFIG_FILE", "CORE_FILE", "MongarsLLM2Vec"]

#: the module's settings, in the export's root folder
CONFIG_FILE = "mongars_st_config.json"
#: the LLM2Vec core shipped next to this file
CORE_FILE = "_mongars_llm2vec.py"
_DTYPES = {"float32", "bfloat16", "float16"}


def _load_core(path: Path) -> ModuleType:
    """The LLM2Vec core at ``path``, imported once per file."""
    name = f"_mongars_llm2vec_{abs(hash(str(path.resolve()))):x}"
    module = sys.modules.get(name)
    if module is not None:
        return module
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None or not path.is_file():
        raise ImportError(
            f"{path} is missing: the export needs the LLM2Vec core written with it; export it "
            "again (mongars-llm export RUN_DIR --format st)"
        )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while it executes
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


class MongarsLLM2Vec(InputModule):  # type: ignore[misc]
    """Base decoder + LoRA embedding adapter + tokenizer, embedding as mongars-llm's runtime.

    Outputs ``token_embeddings``, ``attention_mask`` and ``sentence_embedding``
    (pooled, float32, not normalised: the ``Normalize`` module that follows does
    that). ``max_seq_length`` is where inputs are cut (the runtime's limit,
    recorded at export); set ``model.max_seq_length`` to change it.
    """

    config_file_name = CONFIG_FILE
    config_keys = [
        "pooling",
        "bidirectional",
        "max_seq_length",
        "model_type",
        "prompt_model_id",
        "doc_max_length",
    ]
    save_in_root = True

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        core: ModuleType,
        config: dict[str, Any],
    ) -> None:
        super().__init__()
        self.auto_model = model
        self.tokenizer = tokenizer
        self._core = core
        self.config = dict(config)
        self.pooling: str = core.pooling_mode(config.get("pooling") or core.DEFAULT_POOLING)
        self.bidirectional = bool(config.get("bidirectional", False))
        self.model_type = str(config.get("model_type") or "")
        self.prompt_model_id = str(config.get("prompt_model_id") or "")
        self.doc_max_length = config.get("doc_max_length")
        text_config = model.config
        if hasattr(text_config, "get_text_config"):
            text_config = text_config.get_text_config()
        limits = [
            int(value)
            for value in (
                config.get("max_seq_length"),
                getattr(text_config, "max_position_embeddings", None),
            )
            if value
        ]
        self.max_seq_length: int = min(limits) if limits else 1 << 30
        message = core.check_pooling(
            tokenizer, self.pooling, model_type=self.model_type, model_id=self.prompt_model_id
        )
        if message:
            warnings.warn(message, core.EmbeddingWarning, stacklevel=2)

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(  # type: ignore[override]
        cls,
        model_name_or_path: str,
        subfolder: str = "",
        token: bool | str | None = None,
        cache_folder: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> MongarsLLM2Vec:
        """Load from the export folder (a local folder or a Hub repository)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = cls.load_dir_path(
            model_name_or_path,
            subfolder=subfolder,
            token=token,
            cache_folder=cache_folder,
            revision=revision,
            local_files_only=local_files_only,
        )
        root = Path(folder if folder is not None else model_name_or_path)
        config = json.loads((root / CONFIG_FILE).read_text(encoding="utf-8"))
        core = _load_core(root / config.get("core_file", CORE_FILE))
        tokenizer = AutoTokenizer.from_pretrained(
            str(root / config.get("tokenizer_dir", "tokenizer"))
        )
        options = dict(model_kwargs or {})
        dtype = options.pop("dtype", None) or options.pop("torch_dtype", None)
        if dtype is None:
            dtype = config.get("dtype") or "float32"
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
            dtype = getattr(torch, dtype)
        base = config["base_model"]
        model: Any = AutoModelForCausalLM.from_pretrained(
            base,
            revision=config.get("base_model_revision"),
            dtype=dtype,
            trust_remote_code=bool(config.get("trust_remote_code", False)),
            attn_implementation="sdpa",
            **options,
        )
        from peft import PeftModel

        with warnings.catch_warnings():  # peft reads an attribute transformers 5 deprecates
            warnings.filterwarnings(
                "ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning
            )
            model = PeftModel.from_pretrained(
                model, str(root / config.get("adapter_dir", "adapter"))
            )
        model.eval()
        return cls(model, tokenizer, core, config)

    def save(
        self, output_path: str, *args: Any, safe_serialization: bool = True, **kwargs: Any
    ) -> None:
        """Write the module back (config, adapter, tokenizer, this file and the core)."""
        out = Path(output_path)
        out.mkdir(parents=True, exist_ok=True)
        config = {**self.config, **self.get_config_dict()}
        (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        self.auto_model.save_pretrained(str(out / config.get("adapter_dir", "adapter")))
        tokenizer: Any = self.tokenizer
        tokenizer.save_pretrained(str(out / config.get("tokenizer_dir", "tokenizer")))
        for source, name in (
            (Path(__file__), "mongars_st.py"),
            (Path(str(self._core.__file__)), CORE_FILE),
        ):
            if source.resolve() != (out / name).resolve():
                shutil.copyfile(source, out / name)

    # ------------------------------------------------------------- embedding
    @property
    def _tokenizer_any(self) -> Any:
        """The tokenizer, a transformers one (``InputModule`` types it more widely)."""
        return self.tokenizer

    def preprocess(
        self, inputs: Sequence[Any], prompt: str | None = None, **kwargs: Any
    ) -> dict[str, torch.Tensor]:
        """Tokenise texts (``prompt``: the instruction) or ``[instruction, text]`` pairs,
        marking each text's pooled span as mongars-llm's runtime does."""
        core, tokenizer = self._core, self._tokenizer_any
        items = core.normalise_inputs(list(inputs), prompt or None)
        encoded = core.encode_inputs(
            tokenizer,
            items,
            pooling=self.pooling,
            max_length=self.max_seq_length,
            truncate=True,
            model_type=self.model_type,
            model_id=self.prompt_model_id,
            doc_max_length=self.doc_max_length,
        )
        ids, attention, pooled = core.collate(
            encoded,
            pad_id=tokenizer.pad_token_id,
            padding_side=getattr(tokenizer, "padding_side", None) or "right",
            device="cpu",
        )
        return {"input_ids": ids, "attention_mask": attention.long(), "pooled_mask": pooled}

    def forward(self, features: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        core = self._core
        ids = features["input_ids"]
        attention = features["attention_mask"].bool()
        hidden = core.run_decoder(
            core.decoder_of(self.auto_model), ids, attention, bidirectional=self.bidirectional
        )
        features["token_embeddings"] = hidden
        features["sentence_embedding"] = core.pool(
            hidden,
            attention,
            features["pooled_mask"].bool(),
            ids,
            mode=self.pooling,
            bos_token_id=self._tokenizer_any.bos_token_id,
        )
        return features

    def get_sentence_embedding_dimension(self) -> int:
        text_config = self.auto_model.config
        if hasattr(text_config, "get_text_config"):
            text_config = text_config.get_text_config()
        return int(text_config.hidden_size)

    def get_embedding_dimension(self) -> int:
        return self.get_sentence_embedding_dimension()
