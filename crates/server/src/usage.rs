//! Usage accounting: one row per completed request in an embedded SQLite database.
//!
//! The database is in WAL mode and each record is its own committed INSERT, written before the
//! request's response ends: once a client has seen a complete answer, its record survives a
//! crash (even `kill -9`) of the server. `synchronous=NORMAL` is enough for that (a WAL commit
//! reaches the OS before `INSERT` returns; only a power loss could drop the last ones).

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, params_from_iter, Connection, OptionalExtension};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error("usage database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("{0}")]
    Invalid(String),
}

/// What one completed request cost.
#[derive(Debug, Clone, Default, Serialize)]
pub struct UsageRecord {
    /// Unix seconds when it completed.
    pub ts: f64,
    pub request_id: String,
    pub service: String,
    pub module: String,
    pub endpoint: String,
    /// Finish reason (`stop`, `length`, ...) or `error`.
    pub status: String,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub completion_tokens: u64,
    pub queue_s: f64,
    pub ttft_s: Option<f64>,
    pub duration_s: f64,
    pub cpu_s: f64,
    pub energy_j: f64,
    pub cost: f64,
}

/// A filter and grouping for [`UsageDb::query`].
#[derive(Debug, Clone, Default)]
pub struct UsageQuery {
    pub service: Option<String>,
    pub module: Option<String>,
    /// Unix seconds, or a date/time SQLite understands (`2026-11-23`, `2026-11-23T20:00:00Z`).
    pub from: Option<String>,
    pub to: Option<String>,
    /// Any of `service`, `module`, `minute`, `hour`, `day`; empty: one total row.
    pub group_by: Vec<String>,
}

/// One aggregated row.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct UsageRow {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    /// Start of the time bucket (UTC, ISO 8601) when grouped by time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub period: Option<String>,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub completion_tokens: u64,
    pub cpu_s: f64,
    pub energy_j: f64,
    pub cost: f64,
    pub avg_queue_s: f64,
    pub avg_ttft_s: Option<f64>,
    pub avg_duration_s: f64,
}

pub struct UsageDb {
    conn: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    request_id TEXT NOT NULL,
    service TEXT NOT NULL,
    module TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    status TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    queue_s REAL NOT NULL,
    ttft_s REAL,
    duration_s REAL NOT NULL,
    cpu_s REAL NOT NULL,
    energy_j REAL NOT NULL,
    cost REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS requests_ts ON requests(ts);
CREATE INDEX IF NOT EXISTS requests_service_ts ON requests(service, ts);
";

impl UsageDb {
    /// Open (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<UsageDb, UsageError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_millis(250))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(SCHEMA)?;
        Ok(UsageDb {
            conn: Mutex::new(conn),
        })
    }

    /// An in-memory database (no config: usage is still shown while the server runs).
    pub fn in_memory() -> Result<UsageDb, UsageError> {
        let conn = Connection::open_in_memory()?;
        conn.execute_batch(SCHEMA)?;
        Ok(UsageDb {
            conn: Mutex::new(conn),
        })
    }

    /// Insert and commit one record.
    pub fn record(&self, r: &UsageRecord) -> Result<(), UsageError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        conn.execute(
            "INSERT INTO requests (ts, request_id, service, module, endpoint, status,
                prompt_tokens, cached_tokens, completion_tokens, queue_s, ttft_s, duration_s,
                cpu_s, energy_j, cost)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
            params![
                r.ts,
                r.request_id,
                r.service,
                r.module,
                r.endpoint,
                r.status,
                r.prompt_tokens as i64,
                r.cached_tokens as i64,
                r.completion_tokens as i64,
                r.queue_s,
                r.ttft_s,
                r.duration_s,
                r.cpu_s,
                r.energy_j,
                r.cost
            ],
        )?;
        Ok(())
    }

    /// Aggregate records.
    pub fn query(&self, q: &UsageQuery) -> Result<Vec<UsageRow>, UsageError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        query(&conn, q)
    }

    /// How many records there are.
    pub fn count(&self) -> Result<u64, UsageError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        Ok(conn.query_row("SELECT COUNT(*) FROM requests", [], |r| r.get::<_, i64>(0))? as u64)
    }
}

/// A time bound as unix seconds: a number, or a date/time parsed by SQLite.
fn bound(conn: &Connection, name: &str, v: &str) -> Result<f64, UsageError> {
    if let Ok(x) = v.trim().parse::<f64>() {
        return Ok(x);
    }
    let t: Option<f64> = conn
        .query_row("SELECT CAST(strftime('%s', ?1) AS REAL)", [v.trim()], |r| {
            r.get(0)
        })
        .optional()?
        .flatten();
    t.ok_or_else(|| {
        UsageError::Invalid(format!(
            "{name}={v:?} is not a time: use unix seconds, YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ"
        ))
    })
}

/// Run an aggregate query on an open connection (shared by the server and `modu usage`).
pub fn query(conn: &Connection, q: &UsageQuery) -> Result<Vec<UsageRow>, UsageError> {
    let mut wher = vec!["1=1".to_string()];
    let mut args: Vec<rusqlite::types::Value> = vec![];
    if let Some(s) = &q.service {
        args.push(s.clone().into());
        wher.push(format!("service = ?{}", args.len()));
    }
    if let Some(m) = &q.module {
        args.push(m.clone().into());
        wher.push(format!("module = ?{}", args.len()));
    }
    if let Some(f) = &q.from {
        args.push(bound(conn, "from", f)?.into());
        wher.push(format!("ts >= ?{}", args.len()));
    }
    if let Some(t) = &q.to {
        args.push(bound(conn, "to", t)?.into());
        wher.push(format!("ts < ?{}", args.len()));
    }
    let (mut by_service, mut by_module, mut period) = (false, false, None);
    for g in &q.group_by {
        match g.trim() {
            "service" => by_service = true,
            "module" => by_module = true,
            "minute" => period = Some("%Y-%m-%dT%H:%M:00Z"),
            "hour" => period = Some("%Y-%m-%dT%H:00:00Z"),
            "day" => period = Some("%Y-%m-%d"),
            "" => {}
            other => {
                return Err(UsageError::Invalid(format!(
                    "group_by {other:?}: expected service, module, minute, hour or day"
                )))
            }
        }
    }
    let svc = if by_service { "service" } else { "NULL" };
    let module = if by_module { "module" } else { "NULL" };
    let per = match period {
        Some(f) => format!("strftime('{f}', ts, 'unixepoch')"),
        None => "NULL".into(),
    };
    let sql = format!(
        "SELECT {svc}, {module}, {per}, COUNT(*), COALESCE(SUM(prompt_tokens),0),
            COALESCE(SUM(cached_tokens),0), COALESCE(SUM(completion_tokens),0),
            COALESCE(SUM(cpu_s),0), COALESCE(SUM(energy_j),0), COALESCE(SUM(cost),0),
            COALESCE(AVG(queue_s),0), AVG(ttft_s), COALESCE(AVG(duration_s),0)
         FROM requests WHERE {} GROUP BY 1, 2, 3 ORDER BY 3, 1, 2",
        wher.join(" AND ")
    );
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map(params_from_iter(args), |r| {
        Ok(UsageRow {
            service: r.get(0)?,
            module: r.get(1)?,
            period: r.get(2)?,
            requests: r.get::<_, i64>(3)? as u64,
            prompt_tokens: r.get::<_, i64>(4)? as u64,
            cached_tokens: r.get::<_, i64>(5)? as u64,
            completion_tokens: r.get::<_, i64>(6)? as u64,
            cpu_s: r.get(7)?,
            energy_j: r.get(8)?,
            cost: r.get(9)?,
            avg_queue_s: r.get(10)?,
            avg_ttft_s: r.get(11)?,
            avg_duration_s: r.get(12)?,
        })
    })?;
    let mut out = vec![];
    for row in rows {
        let row = row?;
        // An empty table still yields one total row from the aggregate; drop it.
        if row.requests > 0 {
            out.push(row);
        }
    }
    Ok(out)
}

/// CPU-seconds (user + system) used so far by this whole process, all threads.
pub fn process_cpu_seconds() -> f64 {
    // SAFETY: `rusage` is plain old data, so all-zero is a valid value, and getrusage only
    // writes into the struct we pass; RUSAGE_SELF is always a valid `who`.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut ru) != 0 {
            return 0.0;
        }
        ru
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

const RAPL: &str = "/sys/class/powercap/intel-rapl:0";

/// Measures one scheduler step: process CPU time, wall time and (when Intel RAPL counters are
/// readable) package energy.
pub struct StepMeter {
    rapl_max_uj: Option<u64>,
    t0: std::time::Instant,
    cpu0: f64,
    e0: Option<u64>,
}

impl Default for StepMeter {
    fn default() -> Self {
        StepMeter::new()
    }
}

impl StepMeter {
    pub fn new() -> StepMeter {
        let rapl_max_uj = read_u64(&format!("{RAPL}/max_energy_range_uj"))
            .filter(|_| read_u64(&format!("{RAPL}/energy_uj")).is_some());
        StepMeter {
            rapl_max_uj,
            t0: std::time::Instant::now(),
            cpu0: 0.0,
            e0: None,
        }
    }

    pub fn start(&mut self) {
        self.t0 = std::time::Instant::now();
        self.cpu0 = process_cpu_seconds();
        self.e0 = self
            .rapl_max_uj
            .and_then(|_| read_u64(&format!("{RAPL}/energy_uj")));
    }

    /// (CPU-seconds, wall seconds, joules if measured) since [`StepMeter::start`].
    pub fn stop(&mut self) -> (f64, f64, Option<f64>) {
        let cpu = (process_cpu_seconds() - self.cpu0).max(0.0);
        let wall = self.t0.elapsed().as_secs_f64();
        let energy = match (self.e0, self.rapl_max_uj) {
            (Some(e0), Some(max)) => read_u64(&format!("{RAPL}/energy_uj")).map(|e1| {
                // The counter wraps at max_energy_range_uj.
                let d = if e1 >= e0 { e1 - e0 } else { max - e0 + e1 };
                d as f64 * 1e-6
            }),
            _ => None,
        };
        (cpu, wall, energy)
    }
}

fn read_u64(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_and_group() {
        let db = UsageDb::in_memory().unwrap();
        for (svc, t) in [
            ("a", 1_700_000_000.0),
            ("a", 1_700_003_700.0),
            ("b", 1_700_000_010.0),
        ] {
            db.record(&UsageRecord {
                ts: t,
                service: svc.into(),
                module: "m".into(),
                prompt_tokens: 10,
                completion_tokens: 5,
                cost: 0.5,
                ..Default::default()
            })
            .unwrap();
        }
        let by_svc = db
            .query(&UsageQuery {
                group_by: vec!["service".into()],
                ..Default::default()
            })
            .unwrap();
        assert_eq!(by_svc.len(), 2);
        assert_eq!(by_svc[0].service.as_deref(), Some("a"));
        assert_eq!(by_svc[0].requests, 2);
        assert_eq!(by_svc[0].completion_tokens, 10);
        let hours = db
            .query(&UsageQuery {
                service: Some("a".into()),
                group_by: vec!["hour".into()],
                ..Default::default()
            })
            .unwrap();
        assert_eq!(hours.len(), 2);
        let from = db
            .query(&UsageQuery {
                from: Some("2023-11-14T23:00:00Z".into()),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(from[0].requests, 1);
        assert!(db
            .query(&UsageQuery {
                from: Some("yesterday-ish".into()),
                ..Default::default()
            })
            .is_err());
    }
}
