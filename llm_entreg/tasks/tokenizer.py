"""A tiny byte-level tokenizer for the embedded default task, built offline with ``tokenizers``.

Every byte is one token (a byte-level BPE with no merges); four special tokens come first::

    <pad> = 0    <unk> = 1    <bos> = 2    <eos> = 3    byte b = 4 + b

so digits, letters and punctuation are one token each and any UTF-8 text round-trips exactly:
``decode(encode(s), skip_special_tokens=True) == s``. ``<unk>`` is never produced (kept so that loaders which add a
default unknown token find one and do not grow the vocabulary).

The pipeline (NFC normalizer, byte-level pre-tokenizer and decoder, BPE model without merges) is deliberately
equivalent to the one ``transformers``' ``Qwen2Tokenizer`` rebuilds from a vocabulary: ``AutoTokenizer`` loads a
checkpoint whose ``model_type`` is ``qwen2`` with that class, whatever ``tokenizer_config.json`` says, and rebuilds
everything but the vocabulary and the post-processor. Mirroring it makes the saved tokenizer load back identical
for both architectures (a test checks it).

Encoding prepends ``<bos>`` (a post-processor, like Llama's tokenizer) and never appends ``<eos>``: TRL's trainers
append ``tokenizer.eos_token`` to completions themselves (DPO, SFT) or stop generation on ``eos_token_id`` (GRPO).
Because every byte is its own token, the tokenized prompt is always a prefix of the tokenized prompt + completion,
which is what TRL's DPO preprocessing checks (``common_prefix_length``).

The chat template renders user / system turns as their bare text and assistant turns as ``content + eos_token``,
wrapped in ``{% generation %}`` so that ``return_assistant_tokens_mask`` works; ``add_generation_prompt`` adds
nothing. A conversation ``[user "12+7=", assistant "19"]`` therefore renders exactly like the standard-format
example ``prompt="12+7=", completion="19"``.
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
