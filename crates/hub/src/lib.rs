//! modu-hub
