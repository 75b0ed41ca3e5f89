//! `modu`: run quantized GGUF language models on the CPU.

mod pull;
mod run;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "modu",
    version,
    about = "Lightweight, modular LLM inference on CPUs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fetch a known model (or hf:OWNER/REPO/FILE.gguf) into the cache.
    Pull {
        /// Model name, alias or hf: source.
        name: String,
    },
    /// List known and cached models.
    List,
    /// Generate text from a prompt.
    Run(run::RunArgs),
    /// Interactive chat using the model's chat template.
    Chat(run::ChatArgs),
    /// Print the token ids of a text.
    Tokenize(run::TokenizeArgs),
    /// Show a model's metadata and a tensor summary.
    Info(run::InfoArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Pull { name } => pull::run_pull(&name),
        Command::List => pull::run_list(),
        Command::Run(a) => run::run(a),
        Command::Chat(a) => run::chat(a),
        Command::Tokenize(a) => run::tokenize(a),
        Command::Info(a) => run::info(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
