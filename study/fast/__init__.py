"""The optional GPU fast path: the whole training step replayed as a CUDA graph (`graphstep`,
`study run --cuda-graph`) and groups of runs trained as one grouped network (`fused`, with the
grouped CIFAR net in `grouped`; `study run --fuse K`). Nothing here changes what a run computes:
a run trains the same without it, only slower on a GPU."""
