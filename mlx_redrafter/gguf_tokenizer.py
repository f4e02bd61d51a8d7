"""The tokenizer of a GGUF file, built from its metadata (byte-level BPE vocabularies).

`tokenizer.ggml.pre` names the pre-tokenizer: the regexes that split text
into words before BPE merges run inside each word. The table below holds
llama.cpp's regexes for each name we support (llama-vocab.cpp), applied in
sequence as llama.cpp does: each regex splits the pieces the previous one
left, matches and the text between them both kept. They equal the models'
own Hugging Face pre-tokenizers (tests/fixtures/tokenizer_golden.json holds
token ids from those, and from llama.cpp); Qwen2's also normalizes to NFC,
which llama.cpp skips, and we follow the model's own tokenizer there. An unknown name is refused: a
wrong split changes token ids silently (digits, whitespace runs), and the
model then answers a slightly different prompt.
"""

import sys
from typing import List, NamedTuple

from .gguf import meta_value

# llama.cpp's GPT-2 regex; its own splitter also keeps a whitespace run the
# regex leaves unmatched, as Hugging Face's `|\s+` alternative does.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")


class PreTokenizer(NamedTuple):
    regexes: List[str]  # applied in order
    ignore_merges: bool = False  # a word that is itself a token stays whole (Llama 3's tokenizer.json)
    nfc: bool = False  # Unicode NFC first (Qwen2's tokenizer.json; llama.cpp does not normalize)


PRE_TOKENIZERS = {
    "default": PreTokenizer([r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"]),
    "gpt-2": PreTokenizer([_GPT2]),
    "smollm": PreTokenizer([r"\p{N}", _GPT2]),
    "starcoder": PreTokenizer([r"\p{N}", _GPT2]),
    "llama-bpe": PreTokenizer([_LLAMA3], ignore_merges=True),
    "qwen2": PreTokenizer([_QWEN2], nfc=True),
}
for _alias, _name in (("gpt2", "gpt-2"), ("llama3", "llama-bpe"), ("llama-v3", "llama-bpe")):
    PRE_TOKENIZERS[_alias] = PRE_TOKENIZERS[_name]  # llama.cpp's other names (gpt2: tokenizer.ggml.model's spelling)


def pre_tokenizer_of(meta: dict) -> PreTokenizer:
    """The pre-tokenizer for the file's tokenizer.ggml.pre; unknown names are refused."""
    name = meta_value(meta.get("tokenizer.ggml.pre"))
    if name is None or name == "":
        print("note: this GGUF names no pre-tokenizer (tokenizer.ggml.pre); using llama.cpp's 'default' "
              "regexes, which may split text differently from the model's own tokenizer", file=sys.stderr)
        return PRE_TOKENIZERS["default"]
    if not isinstance(name, str) or name not in PRE_TOKENIZERS:
        raise ValueError(
            f"GGUF pre-tokenizer {str(name)[:40]!r} (tokenizer.ggml.pre) is not supported (supported: "
            f"{', '.join(sorted(PRE_TOKENIZERS))}): load the model's Hugging Face directory instead"
        )
    return PRE_TOKENIZERS[name]


def build_tokenizer(meta: dict):
    """A transformers fast tokenizer built from GGUF metadata (byte-level BPE vocabularies)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"GGUF tokenizer type {kind!r} is not supported (only byte-level BPE, 'gpt2'): "
            "pass a Hugging Face model directory instead"
        )
    tokens, merges = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.merges")
    if not (isinstance(tokens, list) and tokens and all(isinstance(t, str) for t in tokens)):
        raise ValueError("GGUF metadata tokenizer.ggml.tokens is missing or not a list of strings")
    if not (isinstance(merges, list) and all(isinstance(m, str) and " " in m for m in merges)):
        raise ValueError("GGUF metadata tokenizer.ggml.merges is missing or not a list of 'a b' strings")
    pre = pre_tokenizer_of(meta)
    merges = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=pre.ignore_merges))
    if pre.nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    types = meta_value(meta.get("tokenizer.ggml.token_type")) or []
    if not isinstance(types, list):
        types = [types]
    special = [tokens[i] for i, t in enumerate(types[: len(tokens)]) if t in (3, 4)]  # control, user-defined
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])

    def token_id(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        if i is None:
            return None
        i = meta_value(i)
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(tokens):
            raise ValueError(f"GGUF metadata tokenizer.ggml.{key}_token_id = {str(i)[:40]} is not a token id "
                             f"(the vocabulary has {len(tokens)} tokens)")
        return i

    def token(key):
        i = token_id(key)
        return None if i is None else tokens[i]

    bos = token_id("bos")
    if bos is not None and meta_value(meta.get("tokenizer.ggml.add_bos_token")) is True:
        # as llama.cpp and the model's own tokenizer do for plain text (chat templates write it themselves)
        b = tokens[bos]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{b} $A", pair=f"{b} $A {b} $B", special_tokens=[(b, bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=token("bos"),
        eos_token=token("eos"),
        unk_token=token("unknown"),
        pad_token=token("padding"),
        chat_template=meta.get("tokenizer.chat_template"),
    )
