"""A tiny byte-level tokenizer for the embedded default (one token per byte, four special tokens first), built offline
with ``tokenizers`` so that it loads back identical through ``AutoTokenizer``. Why it is built this way:
docs/embedded_default.md ("Tokenizer").
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
BOS_TOKEN = "<bos>"
EOS_TOKEN = "<eos>"
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN)

#: Id of byte ``b`` is ``BYTE_OFFSET + b``.
BYTE_OFFSET = len(SPECIAL_TOKENS)


def byte_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable character map of byte-level BPE (printable Latin-1 bytes map to themselves,
    the others to code points from 256 up, in byte order)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{%- else -%}"
    "{{ message['content'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

#: Maximum sequence length the tokenizer advertises (prompt + completion of every built-in task fits easily).
MODEL_MAX_LENGTH = 128


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Build the byte-level tokenizer (deterministic: same ids on every call and every machine).

    Returns a :class:`transformers.PreTrainedTokenizerFast` with ``pad``, ``unk``, ``bos`` and ``eos`` set, a chat
    template, right padding by default, and ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` support.
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for b, ch in byte_to_unicode().items():
        vocab[ch] = BYTE_OFFSET + b
    backend = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=[],
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    backend.normalizer = normalizers.NFC()
    # No merges: every byte is its own token whatever the pre-tokenizer splits, so the plain byte-level step gives the
    # same ids as Qwen2's regex split + byte-level step.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    bos_id = vocab[BOS_TOKEN]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    # Registered as special so that "<eos>" in text is one token and skip_special_tokens drops it.
    backend.add_special_tokens(list(SPECIAL_TOKENS))

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
