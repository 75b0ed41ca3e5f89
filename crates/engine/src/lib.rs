//! modu-engine
