"""Routed-expert streaming for MoE models, one module per piece:

- `streamer`: `ExpertStreamer`, the MoE hot path (the twin of `layer_streamer.LayerStreamer`):
  per MoE layer, load the routed experts that miss, prefetch the predicted ones, run the model's
  own per-expert loop on streamed tensors.
- `cache`: the device expert cache (slot rings keyed by expert, eviction policies) and its sizing.
- `predict`: the predictor seam (`ExpertPredictor`, what a predictor plugin is built from).
- `predictor_net`: the learned predictor's network and its safetensors file format.
- `training`: routing traces and training of that network (a tool; the runtime never imports it).
"""
