"""The `host` placement: FFN layers, shares of them and MoE experts computed on CPU threads straight
from the host store, so only hidden states (kilobytes per token) cross the link.

- `kernels`: a weight ready for `linear` on the host (as loaded, int8 or int4 packed for PyTorch's
  CPU kernels), and the torch-function mode that routes a module's `linear` calls to them;
- `twin`: a copy of an FFN module whose parameters point at host weights, so the host share of a
  layer computes with the model's own forward while the device computes its share at the same time;
- `split`: which parameters of a dense FFN are cut along its intermediate dimension;
- `worker`: the thread that runs host shares beside the device's work;
- `probe`: host memory read bandwidth and host FFN throughput, measured for the model's shapes.
"""
