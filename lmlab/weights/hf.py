"""Hugging Face model folders in and out: the GPT-2, Llama, Mistral, Qwen2 and Gemma 3 (text) families.

In: config.json plus model.safetensors, a sharded model.safetensors.index.json, or pytorch_model.bin
(read with torch.load(weights_only=True): nothing in a checkpoint is executed). Out: `save_hf` writes a
folder that `transformers.AutoModelForCausalLM.from_pretrained` loads with the same logits.

Name and layout differences handled here (lmlab keeps Meta/llama2.c names, lmlab/model/transformer.py):
- Llama family: q_proj/k_proj rows (and Qwen2's biases) use the rotate-half RoPE layout and are
  permuted per head (lmlab.weights.to_interleaved); gate/up/down_proj are w1/w3/w2.
- GPT-2: Conv1D stores weights as (in, out), so they are transposed; c_attn is wq|wk|wv side by side;
  `gelu_new` is the tanh approximation of GELU.
- Gemma 3 (`gemma3_text`, Gemma3ForCausalLM): the Llama layout plus q/k norms (whose channels are
  permuted like the rows of wq/wk) and norms after attention and MLP; HF's input_layernorm /
  post_attention_layernorm / pre_feedforward_layernorm / post_feedforward_layernorm are lmlab's
  attention_norm / post_attention_norm / ffn_norm / post_ffn_norm. Gemma's norms scale by (1 + w);
  lmlab stores 1 + w as the weight (as GGUF does), so 1 is added on the way in and subtracted on
  the way out. `layer_types` (every k-th layer global) is global_every; rope_parameters'
  sliding_attention base is rope_local_theta.
Defaults for keys absent from a config.json are those of the transformers config classes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmlab.errors import CheckpointError, ConfigError
from lmlab.fileio import write_output_dir
from lmlab.model.config import ModelConfig
from lmlab.model.transformer import unwrap
from lmlab.weights.build import to_interleaved, to_rotate_half
from lmlab.weights.checkpoint import model_state

FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "gemma3_text")
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
# transformers' defaults for the keys lmlab reads (LlamaConfig, MistralConfig, Qwen2Config, GPT2Config)
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=2048,
                  hidden_act="silu", attention_bias=False, mlp_bias=False, rope_theta=10000.0),
    "mistral": dict(rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=4096 * 32,
                    hidden_act="silu", sliding_window=4096, rope_theta=10000.0),
    "qwen2": dict(rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=32768,
                  hidden_act="silu", use_sliding_window=False, rope_theta=10000.0),
    "gpt2": dict(layer_norm_epsilon=1e-5, tie_word_embeddings=True, n_positions=1024, n_inner=None,
                 activation_function="gelu_new", scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False),
    "gemma3_text": dict(rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=131072,
                        hidden_activation="gelu_pytorch_tanh", head_dim=256, query_pre_attn_scalar=256,
                        sliding_window=4096, attention_bias=False, rope_theta=1_000_000.0,
                        rope_local_base_freq=10_000.0, sliding_window_pattern=6),
}
GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "none"}
LLAMA_LAYER = {
    "input_layernorm": "attention_norm", "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3", "mlp.down_proj": "feed_forward.w2",
}
LLAMA_TOP = {"model.embed_tokens": "tok_embeddings", "model.norm": "norm", "lm_head": "output"}
GEMMA3_LAYER = {
    **LLAMA_LAYER, "post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffn_norm", "self_attn.q_norm": "attention.q_norm",
    "self_attn.k_norm": "attention.k_norm",
}
LAYER_MAPS = {"gemma3_text": GEMMA3_LAYER}  # per family, where it differs from Llama's
_LAYER_RE = re.compile(r"(?:model\.)?layers\.(\d+)\.(.+)\.(weight|bias)$")


def is_hf_dir(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return "model_type" in json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return False


# ---- config

def config_from_hf(cfg: dict[str, Any], source: str) -> ModelConfig:
    """lmlab ModelConfig from a parsed config.json; unsupported settings are errors naming the key."""
    family = cfg.get("model_type")
    if family not in FAMILIES:
        raise CheckpointError(f"{source}: model_type {family!r} is not supported; supported: {list(FAMILIES)}")
    get = _getter(cfg, family, source)
    if family == "gemma3_text":
        return _gemma3_config(get, cfg, source)
    return _gpt2_config(get, cfg, source) if family == "gpt2" else _llama_config(get, family, cfg, source)


def _getter(cfg: dict[str, Any], family: str, source: str):
    defaults = HF_DEFAULTS[family]

    def get(key: str) -> Any:
        if cfg.get(key) is not None:
            return cfg[key]
        if key in defaults:
            return defaults[key]
        raise CheckpointError(f"{source}: config.json has no {key!r} (needed for a {family} model)")

    return get


def _gpt2_config(get, cfg: dict[str, Any], source: str) -> ModelConfig:
    act = get("activation_function")
    if act not in GELU:
        raise CheckpointError(f"{source}: activation_function={act!r} is not supported; supported: {sorted(GELU)}")
    if not get("scale_attn_weights") or get("scale_attn_by_inverse_layer_idx"):
        raise CheckpointError(f"{source}: only GPT-2's default attention scaling 1/sqrt(head_dim) is supported "
                              "(scale_attn_weights=true, scale_attn_by_inverse_layer_idx=false)")
    dim = get("n_embd")
    return ModelConfig(
        name=cfg.get("_name_or_path") or "gpt2", vocab_size=get("vocab_size"), dim=dim, n_layers=get("n_layer"),
        n_heads=get("n_head"), hidden_dim=get("n_inner") or 4 * dim, max_seq_len=get("n_positions"),
        norm="layernorm", norm_eps=get("layer_norm_epsilon"), pos="learned", mlp="gelu",
        gelu_approximate=GELU[act], qkv_bias=True, out_bias=True, mlp_bias=True,
        tie_embeddings=bool(get("tie_word_embeddings")),
    )


def _llama_config(get, family: str, cfg: dict[str, Any], source: str) -> ModelConfig:
    if get("hidden_act") != "silu":
        raise CheckpointError(f"{source}: hidden_act={get('hidden_act')!r}; lmlab's SwiGLU needs 'silu'")
    theta, scaling, factor = _rope(cfg, get, source)
    heads = get("num_attention_heads")
    attention_bias = family == "llama" and bool(get("attention_bias"))
    return ModelConfig(
        name=cfg.get("_name_or_path") or family, vocab_size=get("vocab_size"), dim=get("hidden_size"),
        n_layers=get("num_hidden_layers"), n_heads=heads, n_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or get("hidden_size") // heads, hidden_dim=get("intermediate_size"),
        max_seq_len=get("max_position_embeddings"), norm="rmsnorm", norm_eps=get("rms_norm_eps"), pos="rope",
        rope_theta=theta, rope_scaling=scaling, rope_scaling_factor=factor, mlp="swiglu",
        qkv_bias=attention_bias or family == "qwen2", out_bias=attention_bias,
        mlp_bias=family == "llama" and bool(get("mlp_bias")), tie_embeddings=bool(get("tie_word_embeddings")),
        window=_window(family, get, source),
    )


def _gemma3_config(get, cfg: dict[str, Any], source: str) -> ModelConfig:
    """Gemma3TextConfig -> the Gemma switches of ModelConfig (unsupported settings name their key)."""
    if get("hidden_activation") not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise CheckpointError(f"{source}: hidden_activation={get('hidden_activation')!r}; lmlab's GeGLU uses "
                              "the tanh GELU ('gelu_pytorch_tanh')")
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if cfg.get(key) is not None:
            raise CheckpointError(f"{source}: {key}={cfg[key]!r} is not supported (Gemma 3 has none)")
    if cfg.get("use_bidirectional_attention") or get("attention_bias"):
        key = "use_bidirectional_attention" if cfg.get("use_bidirectional_attention") else "attention_bias"
        raise CheckpointError(f"{source}: {key}=true is not supported")
    heads, head_dim = get("num_attention_heads"), get("head_dim")
    if get("query_pre_attn_scalar") != head_dim:
        raise CheckpointError(f"{source}: query_pre_attn_scalar={get('query_pre_attn_scalar')} differs from "
                              f"head_dim={head_dim}; lmlab scales attention by 1/sqrt(head_dim)")
    n_layers = get("num_hidden_layers")
    kinds = cfg.get("layer_types") or ["sliding_attention" if (i + 1) % get("sliding_window_pattern") else
                                        "full_attention" for i in range(n_layers)]
    local = [k == "sliding_attention" for k in kinds]
    every = next((k for k in range(1, n_layers + 1) if local == [bool((i + 1) % k) for i in range(n_layers)]), None)
    if every is None and not all(local):
        raise CheckpointError(f"{source}: layer_types {kinds} is not 'every k-th layer full_attention'")
    params = dict(cfg.get("rope_parameters") or {})
    full = dict(params.get("full_attention") or {"rope_theta": get("rope_theta"), **(cfg.get("rope_scaling") or {})})
    sliding = dict(params.get("sliding_attention") or {"rope_theta": get("rope_local_base_freq")})
    if sliding.get("rope_type", "default") != "default":
        raise CheckpointError(f"{source}: sliding_attention rope_type {sliding['rope_type']!r} is not supported")
    theta, scaling, factor = _rope({"rope_parameters": full}, get, source)
    return ModelConfig(
        name=cfg.get("_name_or_path") or "gemma3", vocab_size=get("vocab_size"), dim=get("hidden_size"),
        n_layers=n_layers, n_heads=heads, n_kv_heads=cfg.get("num_key_value_heads") or heads, head_dim=head_dim,
        hidden_dim=get("intermediate_size"), max_seq_len=get("max_position_embeddings"), norm="rmsnorm",
        norm_eps=get("rms_norm_eps"), pos="rope", rope_theta=theta, rope_scaling=scaling, rope_scaling_factor=factor,
        mlp="geglu", gelu_approximate="tanh", tie_embeddings=bool(get("tie_word_embeddings")),
        window=get("sliding_window") if any(local) else None, global_every=every if any(local) and every else 0,
        rope_local_theta=float(sliding.get("rope_theta") or get("rope_local_base_freq")), qk_norm=True,
        post_norms=True, scale_embeddings=True,
    )


def _rope(cfg: dict[str, Any], get, source: str) -> tuple[float, str | None, float]:
    """(theta, scaling, factor) from transformers 5's rope_parameters or 4.x's rope_theta/rope_scaling."""
    params = dict(cfg.get("rope_scaling") or {})
    params.update(cfg.get("rope_parameters") or {})
    theta = float(params.get("rope_theta") or get("rope_theta"))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None, 1.0
    if kind == "linear":
        return theta, "linear", float(params["factor"])
    raise CheckpointError(f"{source}: rope scaling type {kind!r} is not supported; supported: default, linear")


def _window(family: str, get, source: str) -> int | None:
    if family == "qwen2" and get("use_sliding_window"):
        raise CheckpointError(f"{source}: use_sliding_window=true (Qwen2's per-layer windows) is not supported")
    if family != "mistral" or get("sliding_window") is None:
        return None
    window = int(get("sliding_window"))
    return window if window < get("max_position_embeddings") else None


# ---- weights

def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a model folder: single or sharded safetensors, else pytorch_model.bin(s)."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (folder / single).is_file():
            return _read_file(folder / single)
        if (folder / index_name).is_file():
            try:
                shards = sorted(set(json.loads((folder / index_name).read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError) as err:
                raise CheckpointError(f"{folder / index_name}: not a valid shard index ({err})") from None
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(_read_file(folder / shard))
            return state
    raise CheckpointError(f"{folder}: no weights found (expected model.safetensors, model.safetensors.index.json "
                          "or pytorch_model.bin)")


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path}: unreadable or truncated safetensors file ({err})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # pickle and zip errors come in many types
        raise CheckpointError(f"{path}: not a readable weights-only PyTorch file ({err})") from None


def hf_to_lmlab(
    state: dict[str, torch.Tensor], config: ModelConfig, family: str, source: str
) -> dict[str, torch.Tensor]:
    """Rename (and for the Llama family, re-layout q/k rows of) a Hugging Face state dict."""
    if family == "gpt2":
        return _gpt2_to_lmlab(state, config, source)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name.endswith("rotary_emb.inv_freq"):  # a buffer some old checkpoints saved
            continue
        new = _llama_name(name, LAYER_MAPS.get(family, LLAMA_LAYER), LLAMA_TOP, "layers")
        if new is None:
            raise CheckpointError(f"{source}: unexpected tensor {name!r} for a {family} model")
        if new.endswith(("wq.weight", "wq.bias")):
            tensor = to_interleaved(tensor, config.n_heads)
        elif new.endswith(("wk.weight", "wk.bias")):
            tensor = to_interleaved(tensor, config.n_kv_heads)
        elif new.endswith(("q_norm.weight", "k_norm.weight")):
            tensor = to_interleaved(tensor, 1)  # one head's channels, permuted as the rows above
        if family == "gemma3_text" and new.endswith("norm.weight"):
            tensor = tensor.float() + 1.0  # Gemma scales by (1 + w): lmlab stores the sum (see make_norm)
        out[new] = tensor
    return out


def _llama_name(name: str, layer_map: dict[str, str], top_map: dict[str, str], prefix: str) -> str | None:
    """Rename one tensor with the given tables (used both ways: HF -> lmlab and back)."""
    m = _LAYER_RE.fullmatch(name)
    if m and m.group(2) in layer_map:
        return f"{prefix}.{m.group(1)}.{layer_map[m.group(2)]}.{m.group(3)}"
    base, _, suffix = name.rpartition(".")
    return f"{top_map[base]}.{suffix}" if base in top_map else None


def _gpt2_to_lmlab(state: dict[str, torch.Tensor], c: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    s = {k.removeprefix("transformer."): v for k, v in state.items()
         if not k.endswith((".attn.bias", ".attn.masked_bias"))}  # causal-mask buffers of old files

    def take(name: str) -> torch.Tensor:
        if name not in s:
            raise CheckpointError(f"{source}: missing tensor {name!r} for a gpt2 model")
        return s.pop(name)

    out = {"tok_embeddings.weight": take("wte.weight"), "pos_embeddings.weight": take("wpe.weight")}
    for i in range(c.n_layers):
        h, o = f"h.{i}.", f"layers.{i}."
        for kind in ("weight", "bias"):
            out[o + f"attention_norm.{kind}"] = take(h + f"ln_1.{kind}")
            out[o + f"ffn_norm.{kind}"] = take(h + f"ln_2.{kind}")
        qkv_w, qkv_b = take(h + "attn.c_attn.weight").t(), take(h + "attn.c_attn.bias")  # Conv1D: (in, out)
        for j, name in enumerate(("wq", "wk", "wv")):
            out[o + f"attention.{name}.weight"] = qkv_w[j * c.dim:(j + 1) * c.dim].contiguous()
            out[o + f"attention.{name}.bias"] = qkv_b[j * c.dim:(j + 1) * c.dim].contiguous()
        for hf_name, ours in (("attn.c_proj", "attention.wo"), ("mlp.c_fc", "feed_forward.w1"),
                              ("mlp.c_proj", "feed_forward.w2")):
            out[o + f"{ours}.weight"] = take(h + f"{hf_name}.weight").t().contiguous()
            out[o + f"{ours}.bias"] = take(h + f"{hf_name}.bias")
    out["norm.weight"], out["norm.bias"] = take("ln_f.weight"), take("ln_f.bias")
    if "lm_head.weight" in s:
        out["output.weight"] = s.pop("lm_head.weight")
    if s:
        raise CheckpointError(f"{source}: unexpected tensors for a gpt2 model: {sorted(s)[:8]}")
    return out


def load_hf(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, lmlab state dict in the stored dtype) from a Hugging Face model folder."""
    folder = Path(path)
    config_file = folder / "config.json"
    try:
        cfg = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{config_file}: not found (expected a Hugging Face model folder)") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_file}: not valid JSON ({err})") from None
    config = config_from_hf(cfg, str(config_file))
    state = hf_to_lmlab(read_hf_weights(folder), config, cfg["model_type"], str(folder))
    return config, state


# ---- export

def hf_family(c: ModelConfig) -> str:
    """The transformers architecture that computes exactly what this config does, or a ConfigError."""
    def no(field: str, why: str) -> ConfigError:
        return ConfigError(f"model.{field}={getattr(c, field)!r} has no Hugging Face equivalent ({why})")

    if c.n_experts:
        raise no("n_experts", "mixture-of-experts export is not supported")
    if c.sink_tokens:
        raise no("sink_tokens", "attention sinks")
    gemma = {"mlp": "geglu", "gelu_approximate": "tanh", "qk_norm": True, "post_norms": True,
             "scale_embeddings": True, "norm": "rmsnorm", "pos": "rope", "qkv_bias": False, "out_bias": False,
             "mlp_bias": False}
    if any(getattr(c, f) == gemma[f] for f in ("mlp", "qk_norm", "post_norms", "scale_embeddings")) or c.global_every:
        for field, want in gemma.items():
            if getattr(c, field) != want:
                raise no(field, "Gemma 3, the one family with GeGLU, q/k norms, post-norms, scaled embeddings or "
                         f"local/global layers, needs {field}={want!r}")
        if c.rope_scaling not in (None, "linear"):
            raise no("rope_scaling", "Gemma 3's global layers take linear scaling only")
        return "gemma3_text"
    if c.norm == "layernorm":
        for field, want in (("pos", "learned"), ("mlp", "gelu"), ("qkv_bias", True), ("out_bias", True),
                            ("mlp_bias", True), ("norm_bias", True), ("n_kv_heads", c.n_heads),
                            ("head_dim", c.dim // c.n_heads), ("window", None)):
            if getattr(c, field) != want:
                raise no(field, f"GPT-2, the LayerNorm family, needs {field}={want!r}")
        return "gpt2"
    for field, want in (("pos", "rope"), ("mlp", "swiglu")):
        if getattr(c, field) != want:
            raise no(field, f"the RMSNorm (Llama) family needs {field}={want!r}")
    if c.rope_scaling not in (None, "linear"):
        raise no("rope_scaling", "transformers' 'dynamic' NTK scaling differs from lmlab's static NTK")
    if c.qkv_bias and not c.out_bias and not c.mlp_bias:
        if c.window is not None or c.head_dim != c.dim // c.n_heads:
            raise no("window" if c.window is not None else "head_dim", "Qwen2 (biases on q/k/v only) does not have it")
        return "qwen2"
    if c.qkv_bias != c.out_bias:
        raise no("out_bias", "Llama's attention_bias covers q, k, v and o together")
    if c.window is not None:
        if c.qkv_bias or c.mlp_bias:
            raise no("window", "Mistral (sliding window) has no biases")
        return "mistral"
    return "llama"


def hf_config(c: ModelConfig, family: str, dtype: torch.dtype, tokenizer: Any = None) -> dict[str, Any]:
    """config.json contents for `family` (readable by transformers 4.x and 5.x)."""
    common = dict(architectures=[ARCHITECTURES[family]], model_type=family, vocab_size=c.vocab_size,
                  tie_word_embeddings=c.tie_embeddings, torch_dtype=str(dtype).removeprefix("torch."))
    if tokenizer is not None:
        common.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    if family == "gpt2":
        act = {"tanh": "gelu_new", "none": "gelu"}[c.gelu_approximate]
        return dict(common, n_embd=c.dim, n_layer=c.n_layers, n_head=c.n_heads, n_positions=c.max_seq_len,
                    n_inner=c.hidden_dim, activation_function=act, layer_norm_epsilon=c.norm_eps,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    scaling = None if c.rope_scaling is None else {"rope_type": "linear", "factor": c.rope_scaling_factor}
    rope = {"rope_type": "default", "rope_theta": c.rope_theta, **(scaling or {})}  # transformers 5
    if family == "gemma3_text":
        return _gemma3_hf_config(c, common, rope, scaling)
    out = dict(common, hidden_size=c.dim, intermediate_size=c.hidden_dim, num_hidden_layers=c.n_layers,
               num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
               max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps, hidden_act="silu",
               rope_parameters=rope, rope_theta=c.rope_theta, rope_scaling=scaling)  # the last two: 4.x
    if family == "llama":
        out.update(attention_bias=c.qkv_bias, mlp_bias=c.mlp_bias)
    elif family == "mistral":
        out.update(sliding_window=c.window)
    else:
        out.update(use_sliding_window=False, sliding_window=None)
    return out


def _gemma3_hf_config(c: ModelConfig, common: dict[str, Any], rope: dict[str, Any], scaling: Any) -> dict[str, Any]:
    kinds = ["sliding_attention" if c.window is not None and (c.is_local(i) or not c.global_every) else
             "full_attention" for i in range(c.n_layers)]
    local = {"rope_type": "default", "rope_theta": c.rope_local_theta}
    return dict(common, hidden_size=c.dim, intermediate_size=c.hidden_dim, num_hidden_layers=c.n_layers,
                num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
                query_pre_attn_scalar=c.head_dim, max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
                hidden_activation="gelu_pytorch_tanh", sliding_window=c.window or c.max_seq_len, layer_types=kinds,
                rope_parameters={"full_attention": rope, "sliding_attention": local},  # transformers 5
                rope_theta=c.rope_theta, rope_local_base_freq=c.rope_local_theta, rope_scaling=scaling,  # 4.x
                attention_bias=False, final_logit_softcapping=None, attn_logit_softcapping=None)


def lmlab_to_hf(state: dict[str, torch.Tensor], c: ModelConfig, family: str) -> dict[str, torch.Tensor]:
    """Inverse of `hf_to_lmlab` (tied output weights are left out, as transformers saves them)."""
    if family == "gpt2":
        return _lmlab_to_gpt2(state, c)
    layer_back = {v: k for k, v in LAYER_MAPS.get(family, LLAMA_LAYER).items()}
    top_back = {v: k for k, v in LLAMA_TOP.items()}
    out = {}
    for name, tensor in state.items():
        if name.endswith(("wq.weight", "wq.bias")):
            tensor = to_rotate_half(tensor, c.n_heads)
        elif name.endswith(("wk.weight", "wk.bias")):
            tensor = to_rotate_half(tensor, c.n_kv_heads)
        elif name.endswith(("q_norm.weight", "k_norm.weight")):
            tensor = to_rotate_half(tensor, 1)
        if family == "gemma3_text" and name.endswith("norm.weight"):
            tensor = (tensor.float() - 1.0).to(tensor.dtype)
        out[_llama_name(name, layer_back, top_back, "model.layers")] = tensor.contiguous()
    return out


def _lmlab_to_gpt2(state: dict[str, torch.Tensor], c: ModelConfig) -> dict[str, torch.Tensor]:
    out = {"transformer.wte.weight": state["tok_embeddings.weight"],
           "transformer.wpe.weight": state["pos_embeddings.weight"],
           "transformer.ln_f.weight": state["norm.weight"], "transformer.ln_f.bias": state["norm.bias"]}
    for i in range(c.n_layers):
        h, o = f"transformer.h.{i}.", f"layers.{i}."
        for kind in ("weight", "bias"):
            out[h + f"ln_1.{kind}"] = state[o + f"attention_norm.{kind}"]
            out[h + f"ln_2.{kind}"] = state[o + f"ffn_norm.{kind}"]
        qkv = [state[o + f"attention.{n}.weight"] for n in ("wq", "wk", "wv")]
        out[h + "attn.c_attn.weight"] = torch.cat(qkv).t().contiguous()
        out[h + "attn.c_attn.bias"] = torch.cat([state[o + f"attention.{n}.bias"] for n in ("wq", "wk", "wv")])
        for hf_name, ours in (("attn.c_proj", "attention.wo"), ("mlp.c_fc", "feed_forward.w1"),
                              ("mlp.c_proj", "feed_forward.w2")):
            out[h + f"{hf_name}.weight"] = state[o + f"{ours}.weight"].t().contiguous()
            out[h + f"{hf_name}.bias"] = state[o + f"{ours}.bias"]
    if "output.weight" in state:
        out["lm_head.weight"] = state["output.weight"]
    return out


HF_KIND = "Hugging Face model"


def save_hf(model: torch.nn.Module, out_dir: str | Path, tokenizer: Any = None, *, force: bool = False) -> Path:
    """Write `model` (and its tokenizer) as a Hugging Face folder: a new one, or one holding an earlier
    lmlab export of the same kind (lmlab.fileio.write_output_dir; `force` writes beside other files)."""
    raw = unwrap(model)
    c = raw.config
    family = hf_family(c)
    state = model_state(raw)
    dtype = next(iter(state.values())).dtype
    config = hf_config(c, family, dtype, tokenizer)
    hf_state = lmlab_to_hf(state, c, family)

    def build(tmp: Path) -> None:
        save_file(hf_state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer is not None:
            _save_tokenizer(tokenizer, tmp)

    write_output_dir(build, Path(out_dir), HF_KIND, force=force)
    return Path(out_dir)


def _save_tokenizer(tokenizer: Any, folder: Path) -> None:
    """lmlab's own files always; tokenizer_config.json too when there is a tokenizer.json for
    transformers' PreTrainedTokenizerFast to read."""
    tokenizer.save(folder)
    if not (folder / "tokenizer.json").is_file():
        return

    def text(i: int | None) -> str | None:
        return None if i is None else tokenizer.id_to_token(i)

    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": text(tokenizer.bos_id),
              "eos_token": text(tokenizer.eos_id), "pad_token": text(tokenizer.pad_id),
              "add_bos_token": bool(tokenizer.add_bos), "chat_template": tokenizer.chat_template,
              "model_max_length": 1 << 30, "clean_up_tokenization_spaces": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
