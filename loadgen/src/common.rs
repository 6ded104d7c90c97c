//! Turning the common options into a run configuration, with errors that name the problem.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use crate::cli::Common;
use crate::conn::ConnectOptions;
use crate::run::RunConfig;
use crate::target::{Scheme, Target};

/// Validate the common options and build the run configuration.
pub fn run_config(c: &Common, random_masks: bool, max_message: u64) -> Result<(RunConfig, Target), String> {
    let targets = c.url.iter().map(|u| Target::parse(u)).collect::<Result<Vec<_>, _>>()?;
    let target = targets.first().cloned().ok_or("give the server's --url")?;
    if targets.iter().any(|t| t.scheme != target.scheme) {
        return Err("every --url must use the same scheme (all ws://, all wss:// or all tcp://)".into());
    }
    let tls = if target.scheme == Scheme::Wss {
        Some(crate::tls::client_config(c.insecure, c.ca_file.as_deref())?)
    } else {
        None
    };
    if c.connections == 0 {
        return Err("--connections must be at least 1".into());
    }
    if c.threads == 0 {
        return Err("--threads must be at least 1".into());
    }
    if !(c.duration > 0.0 && c.duration.is_finite()) {
        return Err(format!("--duration must be a positive number of seconds, not {}", c.duration));
    }
    if !(c.timeout > 0.0 && c.timeout.is_finite()) {
        return Err(format!("--timeout must be a positive number of seconds, not {}", c.timeout));
    }
    if c.source_ips == 0 {
        return Err("--source-ips must be at least 1".into());
    }
    if c.source_ips > 1 && targets.iter().any(|t| !t.addr.ip().is_loopback()) {
        return Err("--source-ips spreads over 127.0.0.x and needs a loopback server".into());
    }
    let sources = if c.source_ips > 1 {
        (1..=c.source_ips).map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i))).collect()
    } else {
        Vec::new()
    };
    let headers = c
        .headers
        .iter()
        .map(|h| match h.split_once(':') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
            _ => Err(format!("--header {h:?}: expected \"Name: value\"")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let connect = targets
        .iter()
        .map(|t| {
            let tls = match &tls {
                Some(config) => Some((config.clone(), crate::tls::server_name(&t.host)?)),
                None => None,
            };
            Ok(ConnectOptions {
                tls,
                addr: t.addr,
                host: t.authority.clone(),
                path: t.path.clone(),
                protocols: c.protocols.clone(),
                headers: headers.clone(),
                raw: t.scheme == Scheme::Tcp,
                random_masks,
                max_message,
                check_utf8: true,
                deflate: c.deflate,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let cfg = RunConfig {
        connect,
        threads: c.threads,
        connections: c.connections,
        connect_rate: None,
        timeout: Duration::from_secs_f64(c.timeout),
        sources,
        proc_index: 0,
        progress: crate::run::want_progress(),
    };
    Ok((cfg, target))
}

/// Write a report as JSON where `--json` says (`-` is stdout).
pub fn write_json<T: serde::Serialize>(path: &Option<std::path::PathBuf>, report: &T) -> Result<(), String> {
    let Some(path) = path else { return Ok(()) };
    let text = serde_json::to_string_pretty(report).map_err(|e| e.to_string())?;
    if path.as_os_str() == "-" {
        println!("{text}");
        Ok(())
    } else {
        std::fs::write(path, text + "\n").map_err(|e| format!("cannot write {}: {e}", path.display()))
    }
}

/// An error for a server nobody could connect to, naming the causes in words.
pub fn unreachable(
    url: &str,
    attempted: u64,
    failures: &BTreeMap<String, u64>,
    examples: &BTreeMap<String, String>,
) -> String {
    format!(
        "cannot reach {url}: 0 of {attempted} connections opened: {}",
        crate::report::causes(failures, examples)
    )
}
