//! modu-kernels
