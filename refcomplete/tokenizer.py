"""The GPT-2 (r50k_base) tokenizer, loaded offline from the bundled ranks file.

Knows: token ids <-> bytes, display strings for logprobs, incremental UTF-8 decoding.
Does not know: models, requests, sampling.

The ranks file is OpenAI's r50k_base.tiktoken (see weights/README.md). We parse it
ourselves, byte-for-byte as `tiktoken.load.load_tiktoken_bpe` does, because that
function routes even local paths through tiktoken's download cache; a test checks
the two agree.

Example:
    >>> tok = get_tokenizer()
    >>> tok.encode("Hello world")
    [15496, 995]
    >>> tok.display(tok.encode("\u2019")[0])   # a token that is half a character
    'bytes:\\\\xe2\\\\x80'
"""

from __future__ import annotations

import base64
import codecs
import functools
import hashlib
from pathlib import Path

import tiktoken

from refcomplete._paths import weights_dir

R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
R50K_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
ENDOFTEXT = "<|endoftext|>"
EOT_ID = 50256
N_VOCAB = 50257


class TokenizerFileError(RuntimeError):
    """The ranks file is missing or does not match its published hash."""


def load_ranks(path: Path, expected_sha256: str = R50K_SHA256) -> dict[bytes, int]:
    """Parse a .tiktoken ranks file ("base64-token rank" per line) after checking its hash."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TokenizerFileError(f"tokenizer ranks file {path} cannot be read: {exc}") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected_sha256:
        raise TokenizerFileError(
            f"tokenizer ranks file {path} is corrupted: sha256 {digest}, expected {expected_sha256}"
        )
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def display(token_bytes: bytes) -> str:
    """The logprobs display string of one token (SEMANTICS 5).

    Valid UTF-8 is shown decoded; otherwise "bytes:" then each byte, printable ASCII
    literally and the rest as \\xNN.
    """
    try:
        return token_bytes.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(
            chr(b) if 0x20 <= b < 0x7F else f"\\x{b:02x}" for b in token_bytes
        )


class Tokenizer:
    """r50k_base with `<|endoftext|>` = 50256; `<|endoftext|>` in text encodes to that id."""

    def __init__(self, ranks_path: Path):
        self.path = Path(ranks_path)
        ranks = load_ranks(self.path)
        self.encoding = tiktoken.Encoding(
            name="r50k_base",
            pat_str=R50K_PAT_STR,
            mergeable_ranks=ranks,
            special_tokens={ENDOFTEXT: EOT_ID},
            explicit_n_vocab=N_VOCAB,
        )
        self.n_vocab = N_VOCAB
        self.eot_id = EOT_ID
        self._bytes = [b""] * N_VOCAB                   # id -> bytes: the ranks inverted
        for token, rank in ranks.items():
            self._bytes[rank] = token
        self._bytes[EOT_ID] = ENDOFTEXT.encode()
        self._display = None                             # made on first use (logprobs only)

    def encode(self, text: str) -> list[int]:
        """Encode text; the literal `<|endoftext|>` becomes id 50256 (SEMANTICS 6)."""
        return self.encoding.encode(text, allowed_special="all")

    def token_bytes(self, token: int) -> bytes:
        return self._bytes[token]

    def display(self, token: int) -> str:
        """Display string of one token id for the logprobs object."""
        if self._display is None:
            self._display = [display(b) for b in self._bytes]
        return self._display[token]

    def decode_bytes(self, tokens) -> bytes:
        return b"".join(self._bytes[t] for t in tokens)

    def decode(self, tokens) -> str:
        """UTF-8 decoding of the tokens' bytes, invalid bytes as U+FFFD."""
        return self.decode_bytes(tokens).decode("utf-8", errors="replace")

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Incremental UTF-8 decoding: feed token ids, get the characters they complete.

    Bytes of an unfinished character are held until the next token resolves them;
    `flush()` ends the stream, turning any leftover bytes into U+FFFD. The
    concatenation of all outputs equals `Tokenizer.decode` of all tokens.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token: int) -> str:
        return self._dec.decode(self._tok.token_bytes(token))

    def carried(self, token: int) -> int:
        """Leading characters that feed(token) will emit for bytes that came before it.

        1 when the token breaks an unfinished character, whose bytes then become one
        U+FFFD that belongs to the earlier tokens; 0 otherwise (nothing pending, or the
        token continues the character, which then counts as starting before it).
        """
        pending = self._dec.getstate()[0]
        if not pending:
            return 0
        lead = pending[0]
        need = (2 if lead < 0xE0 else 3 if lead < 0xF0 else 4) - len(pending)
        try:
            codecs.getincrementaldecoder("utf-8")().decode(pending + self._tok.token_bytes(token)[:need])
            return 0
        except UnicodeDecodeError:
            return 1

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)


@functools.lru_cache(maxsize=None)
def get_tokenizer(path: str | None = None) -> Tokenizer:
    """The bundled r50k tokenizer (cached per process)."""
    return Tokenizer(Path(path) if path else weights_dir() / "r50k_base.tiktoken")
