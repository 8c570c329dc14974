"""A prefetching layer streamer: decoder layers live in (pinned) CPU memory and are copied into a
small ring of device-resident layer buffers, the next layer's copy running while this one computes.

Embeddings, final norm and LM head stay on the device. Every decoder layer has the same shapes,
so a ring slot is one real decoder layer module whose tensors are overwritten in place with
layer i's weights before it runs as layer i (its attention's `layer_idx` set to i, so the KV
cache is indexed right). On CUDA the copies run on a side stream: the copy into a slot waits
for the computation that last used it, and the computation waits for its copy. Without CUDA
(`device="cpu"`) the same code copies synchronously, which keeps it tested on any machine.
"""

from __future__ import annotations

import copy

import torch


class StandIn(torch.nn.Module):
    """Stands in for decoder layer i inside the model's ModuleList; `owner.run(i, args, kwargs)` computes it."""

    def __init__(self, owner, index: int, attention_type=None):
        super().__init__()
        self.index = index
        object.__setattr__(self, "_owner", owner)  # not a submodule: no weights here
        self.attention_type = attention_type

    def forward(self, *args, **kwargs):
        return self._owner.run(self.index, args, kwargs)


class LayerStreamer:
    def __init__(self, model: torch.nn.Module, device: str, ring: int = 2):
        self.model, self.device = model, torch.device(device)
        decoder = getattr(model, model.base_model_prefix)
        layers = decoder.layers
        self.n = len(layers)
        self.ring = max(1, min(ring, self.n))
        self.template = layers[0]
        cuda = self.device.type == "cuda"
        # host copies of every layer's tensors, pinned so copies can run asynchronously
        self.host = [self._host_tensors(layer, pin=cuda) for layer in layers]
        shapes = [[t.shape for t in h] for h in self.host]
        if any(s != shapes[0] for s in shapes):
            raise ValueError("layer streaming needs decoder layers of identical shapes")
        self.slots = [copy.deepcopy(layers[0]).to(self.device) for _ in range(self.ring)]
        self.slot_tensors = [self._tensors(s) for s in self.slots]
        for i in range(self.n):  # the model's own layers become weightless stand-ins
            layers[i] = StandIn(self, i, getattr(self.template, "attention_type", None))
        for name, module in model.named_children():  # everything else stays resident on the device
            module.to(self.device)
        self.loaded = [-1] * self.ring
        self.copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self.copied = [None] * self.ring  # event: slot's copy finished
        self.released = [None] * self.ring  # event: slot's last computation finished
        self.bytes_per_layer = sum(t.numel() * t.element_size() for t in self.host[0])
        self.copies = 0
        for i in range(self.ring):
            self._prefetch(i)
        model._specexec_streamer = self

    @staticmethod
    def _tensors(layer: torch.nn.Module) -> list[torch.Tensor]:
        return [t for _, t in sorted(list(layer.named_parameters()) + list(layer.named_buffers()))]

    def _host_tensors(self, layer, pin: bool) -> list[torch.Tensor]:
        out = []
        for t in self._tensors(layer):
            h = t.detach().to("cpu", copy=True)
            out.append(h.pin_memory() if pin else h)
        return out

    def _prefetch(self, index: int) -> None:
        slot = index % self.ring
        if self.loaded[slot] == index:
            return
        if self.copy_stream is None:
            with torch.no_grad():
                for dst, src in zip(self.slot_tensors[slot], self.host[index]):
                    dst.copy_(src)
        else:
            with torch.cuda.stream(self.copy_stream):
                if self.released[slot] is not None:
                    self.copy_stream.wait_event(self.released[slot])
                with torch.no_grad():
                    for dst, src in zip(self.slot_tensors[slot], self.host[index]):
                        dst.copy_(src, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.copy_stream)
                self.copied[slot] = event
        self.loaded[slot] = index
        self.copies += 1

    def run(self, index: int, args, kwargs):
        slot = index % self.ring
        self._prefetch(index)  # a no-op unless the ring was bypassed
        if self.copied[slot] is not None:
            torch.cuda.current_stream(self.device).wait_event(self.copied[slot])
        layer = self.slots[slot]
        attention = getattr(layer, "self_attn", None)
        if attention is not None:
            attention.layer_idx = index
        out = layer(*args, **kwargs)
        if self.copy_stream is not None:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self.released[slot] = event
        self._prefetch((index + self.ring) % self.n)  # refill this slot with the layer `ring` ahead
        return out

    def describe(self) -> str:
        resident = sum(t.numel() * t.element_size() for t in list(self.model.parameters()) + list(self.model.buffers()))
        resident += self.ring * self.bytes_per_layer
        host = self.bytes_per_layer * self.n
        return (f"placement (streamed): {self.n} decoder layers in {'pinned ' if self.copy_stream else ''}CPU memory "
                f"({host / 2**30:.2f} GiB), {self.ring} layer buffers on {self.device}; embeddings, norm and head "
                f"resident; {resident / 2**30:.2f} GiB on {self.device}")
