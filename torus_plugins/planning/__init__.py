"""Planning: how a model is split between the device and host memory, from shapes alone.

- `sizes`: the bytes of each piece of a model (FFN layers as resident and as streamed, non-FFN
  weights, KV cache per token), read from shapes, so a `meta`-device model plans like a loaded one.
- `residency`: the residency plan: which FFN layers stay on the device, which stream, the ring.
- `deployment`: the full answer `torus-sparse plan` prints (fits or not, host memory, the decode
  ceiling the link allows), from the same two steps the engine runs at attach.
"""
