//! `modu key new SERVICE`: create an API key, print it once, store only its hash.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use modu_server::services::{hash_key, ServicesConfig};
use rand::RngCore;
use toml_edit::{value, Array, DocumentMut, Item, Table};

#[derive(Args)]
pub struct KeyArgs {
    #[command(subcommand)]
    pub command: KeyCommand,
}

#[derive(Subcommand)]
pub enum KeyCommand {
    /// Generate a key for SERVICE (created in the config if missing; `--admin` for the admin
    /// key), print it once and add its SHA-256 hash to the config.
    New {
        /// The service the key is for.
        #[arg(required_unless_present = "admin")]
        service: Option<String>,
        /// Create an admin key (reads every service's usage) instead.
        #[arg(long, conflicts_with = "service")]
        admin: bool,
        /// The services config, edited in place (comments and layout are kept).
        #[arg(long, default_value = "modu.toml")]
        config: PathBuf,
    },
}

pub fn key(a: KeyArgs) -> Result<()> {
    match a.command {
        KeyCommand::New {
            service,
            admin,
            config,
        } => new_key(service.as_deref(), admin, &config),
    }
}

/// 32 random bytes from the OS, as `modu-` and 64 hex digits.
fn generate() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("modu-{hex}")
}

fn new_key(service: Option<&str>, admin: bool, path: &Path) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    // Refuse to edit a config the server would not accept.
    ServicesConfig::parse(&text, path)?;
    let mut doc: DocumentMut = text
        .parse()
        .with_context(|| format!("parsing {}", path.display()))?;
    let key = generate();
    let table = if admin {
        table_at(doc.as_table_mut(), "admin", false)?
    } else {
        let name = service.unwrap_or_default();
        if name.trim().is_empty() {
            bail!("the service name must not be empty");
        }
        let services = table_at(doc.as_table_mut(), "services", true)?;
        table_at(services, name, false)?
    };
    let hashes = table
        .entry("key_hashes")
        .or_insert_with(|| value(Array::new()));
    let Some(arr) = hashes.as_array_mut() else {
        bail!("key_hashes in {} is not an array", path.display());
    };
    arr.push(hash_key(&key));
    let out = doc.to_string();
    ServicesConfig::parse(&out, path).context("the edited config does not parse")?;
    // Write a temporary file and rename it: the config is never half written.
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, &out).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    let who = if admin {
        "the admin key".to_string()
    } else {
        format!("service `{}`", service.unwrap_or_default())
    };
    eprintln!(
        "added a key for {who} to {} (only its hash is stored; this is the only time the key is shown):",
        path.display()
    );
    println!("{key}");
    Ok(())
}

/// The table `name` inside `parent`, created if missing (implicit: no header of its own).
fn table_at<'a>(parent: &'a mut Table, name: &str, implicit: bool) -> Result<&'a mut Table> {
    let item = parent.entry(name).or_insert_with(|| {
        let mut t = Table::new();
        t.set_implicit(implicit);
        Item::Table(t)
    });
    item.as_table_mut()
        .with_context(|| format!("`{name}` in the config is not a table"))
}
