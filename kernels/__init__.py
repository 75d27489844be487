"""Block-sparse attention kernels. Installed as ``moa_compress.kernels``.

``reference`` is the specification (plain PyTorch, float64-capable); every other backend is
tested against it. Backends assume valid inputs: ``moa_compress.attention`` checks them.
"""
