"""A seeded generator of malformed frames for the verifier, one kind at a time."""

from __future__ import annotations

import random

import msgpack
import numpy as np

from specexec.protocol.codec import encode
from specexec.protocol.framing import TAG, Signer, to_frames
from specexec.protocol.messages import Close, VerifyRequest
from specexec.protocol.tree import DraftTree

KINDS = ("random_bytes", "truncated", "frame_count", "oversized", "wrong_type", "array_length", "array_dtype",
         "non_topological", "out_of_range", "duplicate_siblings", "unknown_type", "wrong_signature", "replayed",
         "unknown_session", "bad_q")


class FrameFuzzer:
    def __init__(self, key: bytes, session: str, vocab: int, seed: int = 0):
        self.rng = random.Random(seed)
        self.signer, self.session, self.vocab = Signer(key), session, vocab
        self.sent_valid: list[list[bytes]] = []

    def _valid_body(self) -> dict:
        n = self.rng.randint(1, 12)
        tree = DraftTree.build(self.rng.sample(range(self.vocab), n), [-1] + [self.rng.randint(-1, i - 1)
                                                                            for i in range(1, n)])
        req = VerifyRequest(self.session, 10**9 + self.rng.randint(0, 10**6), [1, 2, 3], tree, 4)
        return msgpack.unpackb(encode(req), raw=False)

    def _signed(self, body) -> list[bytes]:
        payload = body if isinstance(body, bytes) else msgpack.packb(body, use_bin_type=True)
        return [TAG, self.signer.sign(payload), payload]

    def frames(self, kind: str) -> list[bytes]:
        rng = self.rng
        body = self._valid_body()
        if kind == "random_bytes":
            return [rng.randbytes(rng.randint(0, 8)), rng.randbytes(32), rng.randbytes(rng.randint(0, 300))]
        if kind == "truncated":
            payload = msgpack.packb(body, use_bin_type=True)
            return self._signed(payload[: rng.randint(0, len(payload) - 1)])
        if kind == "frame_count":
            good = self._signed(body)
            return rng.choice([good[:1], good[:2], good + [b"extra"], good + [b"x", b"y"]])
        if kind == "oversized":
            return self._signed(rng.randbytes((8 << 20) + rng.randint(1, 1 << 20)))
        if kind == "wrong_type":
            field = rng.choice(["round", "session", "append", "tokens", "parents", "max_emit", "v"])
            body[field] = rng.choice([None, "text", 3.5, [1, 2], {"a": 1}, True, -1])
            return self._signed(body)
        if kind == "array_length":
            field = rng.choice(["tokens", "parents", "append"])
            body[field] = body[field][: -rng.randint(1, 3)] if len(body[field]) > 4 else body[field] + b"\x00"
            return self._signed(body)
        if kind == "array_dtype":
            field = rng.choice(["tokens", "append"])
            count = len(body[field]) // 4
            body[field] = rng.choice([np.arange(count, dtype="<f4").tobytes() + b"\x00\x00\x80\x7f",
                                      np.arange(count, dtype="<i8").tobytes()[:4 * count + 2],
                                      list(range(count))])
            return self._signed(body)
        if kind == "non_topological":
            parents = np.frombuffer(body["parents"], "<i4").copy()
            i = rng.randrange(len(parents))
            parents[i] = rng.choice([i, i + rng.randint(1, 5), -2 - rng.randint(0, 100)])  # self, forward, below -1
            body["parents"] = parents.tobytes()
            return self._signed(body)
        if kind == "out_of_range":
            field = rng.choice(["tokens", "append"])
            arr = np.frombuffer(body[field], "<i4").copy()
            arr[rng.randrange(len(arr))] = rng.choice([self.vocab, self.vocab + 12345, -1, -(2**31)])
            body[field] = arr.tobytes()
            return self._signed(body)
        if kind == "duplicate_siblings":
            body["tokens"] = np.array([7, 7], "<i4").tobytes()
            body["parents"] = np.array([-1, -1], "<i4").tobytes()
            return self._signed(body)
        if kind == "unknown_type":
            body["t"] = rng.choice(["launch", "", "VERIFY", "shutdown", 5])
            return self._signed(body)
        if kind == "wrong_signature":
            frames = self._signed(body)
            flipped = frames[1][:-1] + bytes([frames[1][-1] ^ 1])  # always differs from the true signature
            return [frames[0], rng.choice([b"", rng.randbytes(32), flipped]), frames[2]]
        if kind == "replayed":
            if not self.sent_valid:
                close = to_frames(self.signer, Close("someone-else"))
                self.sent_valid.append(close)
                return close
            return list(rng.choice(self.sent_valid))
        if kind == "unknown_session":
            body["session"] = "ghost-" + str(rng.randint(0, 10**9))
            return self._signed(body)
        if kind == "bad_q":
            body["q_k"] = rng.choice([0, 2, 5000])
            body["q_ids"] = b"\x00" * 8
            body["q_probs"] = b"\x00" * 8
            return self._signed(body)
        raise ValueError(kind)
