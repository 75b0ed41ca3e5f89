//! `modu usage`: the usage database as a table or CSV.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use modu_server::services::{ServicesConfig, DEFAULT_DATABASE};
use modu_server::usage::{query, UsageQuery, UsageRow};

#[derive(Args)]
pub struct UsageArgs {
    /// The usage database; default: the one `--config` names, else ./modu-usage.db.
    #[arg(long)]
    pub db: Option<PathBuf>,
    /// The services config whose database to read.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub service: Option<String>,
    #[arg(long)]
    pub module: Option<String>,
    /// From (inclusive): unix seconds, YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ (UTC).
    #[arg(long)]
    pub from: Option<String>,
    /// To (exclusive), same forms as --from.
    #[arg(long)]
    pub to: Option<String>,
    /// Comma-separated: service, module, minute, hour, day. Default: service,module.
    #[arg(long, default_value = "service,module")]
    pub group_by: String,
    /// CSV instead of a table.
    #[arg(long)]
    pub csv: bool,
}

/// Terminal columns of a text: Hangul, CJK and full-width characters take two.
fn columns(s: &str) -> usize {
    s.chars()
        .map(|c| match c as u32 {
            0x1100..=0x115F
            | 0x2E80..=0xA4CF
            | 0xAC00..=0xD7A3
            | 0xF900..=0xFAFF
            | 0xFE30..=0xFE4F
            | 0xFF00..=0xFF60
            | 0xFFE0..=0xFFE6 => 2,
            _ => 1,
        })
        .sum()
}

pub fn usage(a: UsageArgs) -> Result<()> {
    let db = match (&a.db, &a.config) {
        (Some(p), _) => p.clone(),
        (None, Some(c)) => ServicesConfig::load(c)?
            .database
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATABASE)),
        (None, None) => PathBuf::from(DEFAULT_DATABASE),
    };
    if !db.exists() {
        anyhow::bail!("no usage database at {}", db.display());
    }
    let conn = rusqlite::Connection::open_with_flags(
        &db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("opening {}", db.display()))?;
    let q = UsageQuery {
        service: a.service,
        module: a.module,
        from: a.from,
        to: a.to,
        group_by: a
            .group_by
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
    };
    let rows = query(&conn, &q)?;
    let header = [
        "period",
        "service",
        "module",
        "requests",
        "prompt",
        "cached",
        "completion",
        "cpu_s",
        "energy_j",
        "cost",
        "avg_queue_s",
        "avg_ttft_s",
        "avg_s",
    ];
    let cells = |r: &UsageRow| -> Vec<String> {
        vec![
            r.period.clone().unwrap_or_default(),
            r.service.clone().unwrap_or_default(),
            r.module.clone().unwrap_or_default(),
            r.requests.to_string(),
            r.prompt_tokens.to_string(),
            r.cached_tokens.to_string(),
            r.completion_tokens.to_string(),
            format!("{:.3}", r.cpu_s),
            format!("{:.1}", r.energy_j),
            format!("{:.6}", r.cost),
            format!("{:.3}", r.avg_queue_s),
            r.avg_ttft_s.map(|t| format!("{t:.3}")).unwrap_or_default(),
            format!("{:.3}", r.avg_duration_s),
        ]
    };
    let body: Vec<Vec<String>> = rows.iter().map(cells).collect();
    if a.csv {
        let esc = |s: &str| {
            if s.contains([',', '"', '\n']) {
                format!("\"{}\"", s.replace('"', "\"\""))
            } else {
                s.to_string()
            }
        };
        println!("{}", header.join(","));
        for row in &body {
            println!(
                "{}",
                row.iter().map(|c| esc(c)).collect::<Vec<_>>().join(",")
            );
        }
        return Ok(());
    }
    // Drop the columns the grouping leaves empty.
    let keep: Vec<usize> = (0..header.len())
        .filter(|&i| i >= 3 || body.iter().any(|r| !r[i].is_empty()))
        .collect();
    let width = |i: usize| {
        body.iter()
            .map(|r| columns(&r[i]))
            .chain([header[i].len()])
            .max()
            .unwrap_or(0)
    };
    let line = |cols: Vec<String>| {
        let parts: Vec<String> = keep
            .iter()
            .map(|&i| {
                let pad = width(i).saturating_sub(columns(&cols[i]));
                if i >= 3 {
                    format!("{}{}", " ".repeat(pad), cols[i])
                } else {
                    format!("{}{}", cols[i], " ".repeat(pad))
                }
            })
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(header.iter().map(|s| s.to_string()).collect());
    for r in body.clone() {
        line(r);
    }
    if rows.is_empty() {
        eprintln!("no requests recorded for this selection");
    }
    Ok(())
}
