"""Parts shared by the tiny SDXL, SD3 and FLUX.1 models: tokenizers, text encoders, a VAE.

The real families condition on CLIP text encoders (SDXL: two; SD3: two, plus T5; FLUX.1: one,
plus T5). Here the CLIP tokenizer is `workers.builtin.tiny`'s (byte-level over printable ASCII, written
locally), and the T5 tokenizer is built the same way with the `tokenizers` library: a Unigram
model whose pieces are the printable ASCII characters and SentencePiece's word marker `▁`, with
T5's special tokens where T5 has them (`<pad>` 0, `</s>` 1, `<unk>` 2) and no sentinel
`<extra_id_*>` tokens. It goes through `T5Tokenizer.from_pretrained`, so it is the tokenizer a
saved pipeline reads back. The CLIP encoders are sized as in diffusers' fast tests (five
layers, 32 wide); the T5 is 64 wide where those tests' is 32, so that SD3's two CLIP embeddings
(32 + 32), zero-padded to the T5's width, fit it whole, as 768 + 1280 fit the 4096 of the real
T5-XXL (with a 32-wide T5 SD3's padding turns into cutting off the second CLIP's half).

Nothing here seeds: the family builders call these inside their own `fork_rng`, after
`torch.manual_seed`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from diffusers import AutoencoderKL, SchedulerMixin
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from workers.builtin.tiny import _tokenizer as _clip_tokenizer

CLIP_WIDTH = 32
"""Hidden size and projection size of every tiny CLIP text encoder."""
T5_WIDTH = 64
"""`d_model` of the tiny T5 encoder: the transformers' `joint_attention_dim`."""
T5_MAX_LENGTH = 512
"""`model_max_length` of the T5 tokenizer, as google/t5-v1_1-xxl's."""

_T5_SPECIAL = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2, as in T5's SentencePiece vocabulary
_WORD_MARK = "▁"


def explicit(scheduler: SchedulerMixin) -> SchedulerMixin:
    """The same scheduler with every value explicit, as one loaded from disk: `from_config` then
    carries all of them (timestep_spacing, shift…) into another class, not that class's defaults."""
    settings = {k: v for k, v in scheduler.config.items() if not k.startswith("_")}
    return type(scheduler)(**settings)


def clip_tokenizer() -> CLIPTokenizer:
    """The tiny CLIP tokenizer (77 tokens), the one `tiny` uses."""
    return _clip_tokenizer()


def t5_tokenizer() -> T5Tokenizer:
    """A T5 tokenizer over printable ASCII, built with `tokenizers` and read back by transformers."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram

    # 1. The Unigram model: specials, the word marker, then one piece per character (equal
    #    scores: with no multi-character pieces every text has one segmentation).
    pieces = [(token, 0.0) for token in _T5_SPECIAL] + [(_WORD_MARK, -2.0)]
    pieces += [(chr(c), -3.0) for c in range(33, 127)]
    tokenizer = Tokenizer(Unigram(pieces, unk_id=_T5_SPECIAL.index("<unk>"), byte_fallback=False))
    # 2. SentencePiece's whitespace handling, and `</s>` after every sequence, as T5 does.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement=_WORD_MARK, prepend_scheme="always", split=True),
        ]
    )
    tokenizer.decoder = decoders.Metaspace(
        replacement=_WORD_MARK, prepend_scheme="always", split=True
    )
    eos_id = _T5_SPECIAL.index("</s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", eos_id)]
    )
    tokenizer.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in _T5_SPECIAL]
    )
    # 3. Written as a transformers tokenizer folder and read back by `T5Tokenizer`.
    config = {
        "tokenizer_class": "T5Tokenizer",
        "pad_token": "<pad>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "extra_ids": 0,
        "model_max_length": T5_MAX_LENGTH,
    }
    with tempfile.TemporaryDirectory(prefix="farm-tiny-t5-tokenizer-") as tmp:
        folder = Path(tmp)
        tokenizer.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
        return T5Tokenizer.from_pretrained(folder, local_files_only=True)


def clip_text_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    """Five layers, 32 wide, projection 32: diffusers' SDXL/SD3/FLUX fast-test encoder."""
    return CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=CLIP_WIDTH,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        hidden_act="gelu",
        projection_dim=CLIP_WIDTH,
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
    )


def clip_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    return CLIPTextModel(clip_text_config(tokenizer)).eval()


def clip_text_encoder_with_projection(tokenizer: CLIPTokenizer) -> CLIPTextModelWithProjection:
    return CLIPTextModelWithProjection(clip_text_config(tokenizer)).eval()


def t5_encoder(tokenizer: T5Tokenizer) -> T5EncoderModel:
    """A two-layer T5 v1.1 encoder (gated GELU, as T5-XXL), 64 wide."""
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=T5_WIDTH,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config).eval()


def vae_16_channels(*, shift_factor: float, scaling_factor: float) -> AutoencoderKL:
    """The 16-channel VAE of SD3 and FLUX.1, 2× down instead of 8× and 8/16 channels wide.

    No quant convolutions, as theirs; latents are normalised as `(z - shift) * scale`.
    """
    return AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=1,
        sample_size=64,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=shift_factor,
        scaling_factor=scaling_factor,
    ).eval()
