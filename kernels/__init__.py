"""Triton kernels of microadam_dist, installed as ``microadam_dist.kernels``.

They work on flat contiguous buffers (a ZeRO partition, an FSDP shard, or a whole parameter)
described by the block geometry of ``microadam_dist.geometry``.
"""
