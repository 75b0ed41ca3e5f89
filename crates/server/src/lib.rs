//! modu's OpenAI-compatible HTTP server. The HTTP side ([`server`]) parses and checks requests,
//! tokenizes them and streams results; the engine side ([`scheduler`]) owns the model on its own
//! thread and runs every admitted request in one continuously batched loop.

mod accounting;
pub mod api;
mod auth;
pub mod error;
pub mod fair;
mod gaie;
mod http;
pub mod metrics;
pub mod modules;
pub mod prefix_cache;
mod prepare;
mod respond;
mod routes;
pub mod scheduler;
mod seq;
pub mod server;
pub mod services;
mod structured;
mod tools;
pub mod usage;

pub use error::{ApiError, ServerError};
pub use server::{
    check_bind_address, model_names, serve, start, HttpLimits, ServeConfig, ServedModel,
    ServerHandle,
};
