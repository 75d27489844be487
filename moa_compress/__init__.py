"""moa-compress: per-head sparse attention plans (MoA-style elastic rules), searched and run fast.

Pipeline: data -> profile -> search -> plan -> runtime -> kernels.
"""

__version__ = "0.1.0"
