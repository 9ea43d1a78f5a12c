"""Plain C for microcontrollers: code generation, kernels, memory planning, verification."""
