"""XLA flags of the test processes. Less LLVM optimisation: the tiny models compile 2-3x faster
on CPU and the suite is compile-bound; values are unchanged within the parity tolerances."""
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
