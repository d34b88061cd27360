//! One resource file for both nodes (`--config FILE --node NAME`), as DRBD has one resource
//! file for its peers, and `lockstep config check`.
//!
//! ```toml
//! [resource]                      # both nodes, both roles
//! size = "10G"
//! psk-file = "/etc/lockstep/r0.key"
//! ack = "received"
//! checkpoint-interval = "100ms"
//!
//! [secondary]                     # only when a node runs as the secondary
//! on-peer-loss = "wait"
//!
//! [node.alpha]
//! address = "10.0.0.1:7790"       # its replication port, when it is the secondary
//! disk = "/var/lib/lockstep/r0.img"
//! control = "/run/lockstep/r0.sock"
//! export = "127.0.0.1:10809"
//!
//! [node.beta]
//! address = "10.0.0.2:7790"
//! disk = "/var/lib/lockstep/r0.img"
//! control = "/run/lockstep/r0.sock"
//! ```
//!
//! Every key is the long name of a flag of `lockstep primary` or `lockstep secondary`; the
//! file's settings become flags placed before the command line's own, and a flag given on the
//! command line wins (a repeatable flag, such as `--memory`, adds to the file's). Later tables
//! win over earlier ones: `[resource]`, then `[primary]` or `[secondary]`, then the node's own.
//! A node's `address` is its `--listen` when it runs as the secondary, and the primary's
//! `--secondary` on the other node. A key that no role knows is an error, so a typo does not
//! pass silently; a key that only the other role knows is left out.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use clap::{ArgAction, Args, Subcommand};
use toml::{Table, Value};

/// The daemons a resource file configures.
pub const ROLES: [&str; 2] = ["primary", "secondary"];

/// A parsed resource file.
#[derive(Debug)]
pub struct Resource {
    path: PathBuf,
    common: Table,
    roles: BTreeMap<String, Table>,
    nodes: BTreeMap<String, Table>,
}

impl Resource {
    /// Read and check the shape of `path`.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the resource file {}", path.display()))?;
        let mut top: Table = toml::from_str(&text)
            .map_err(|e| anyhow!("{}: not a valid resource file: {e}", path.display()))?;
        let table = |v: Value, what: &str| -> anyhow::Result<Table> {
            match v {
                Value::Table(t) => Ok(t),
                _ => bail!("{}: [{what}] must be a table", path.display()),
            }
        };
        let common = top
            .remove("resource")
            .map(|v| table(v, "resource"))
            .transpose()?
            .unwrap_or_default();
        let mut roles = BTreeMap::new();
        for r in ROLES {
            if let Some(v) = top.remove(r) {
                roles.insert(r.to_string(), table(v, r)?);
            }
        }
        let mut nodes = BTreeMap::new();
        if let Some(v) = top.remove("node") {
            for (name, t) in table(v, "node")? {
                nodes.insert(name.clone(), table(t, &format!("node.{name}"))?);
            }
        }
        if let Some(k) = top.keys().next() {
            bail!(
                "{}: unknown table or key {k:?} (the file has [resource], [primary], [secondary] and [node.NAME] tables)",
                path.display()
            );
        }
        if nodes.len() != 2 {
            bail!(
                "{}: a resource has exactly two nodes ([node.NAME] tables); this file has {}",
                path.display(),
                nodes.len()
            );
        }
        Ok(Self {
            path: path.into(),
            common,
            roles,
            nodes,
        })
    }

    /// The node names.
    pub fn node_names(&self) -> Vec<&str> {
        self.nodes.keys().map(String::as_str).collect()
    }

    /// The flags of node `node` running as `role` (one of [`ROLES`]), checked against
    /// `root`'s subcommand for that role; settings only the other role knows are left out
    /// rather than refused.
    pub fn flags(
        &self,
        role: &str,
        node: &str,
        root: &clap::Command,
    ) -> anyhow::Result<Vec<String>> {
        let sub = |r: &str| root.find_subcommand(r).expect("a role subcommand");
        let cmd = sub(role);
        let other = sub(if role == "primary" {
            "secondary"
        } else {
            "primary"
        });
        let file = self.path.display();
        let own = self.nodes.get(node).ok_or_else(|| {
            anyhow!(
                "{file}: no node {node:?} (its nodes: {})",
                self.node_names().join(", ")
            )
        })?;
        let peer = self
            .nodes
            .iter()
            .find(|(n, _)| n.as_str() != node)
            .map(|(_, t)| t)
            .expect("two nodes");
        let mut merged: BTreeMap<String, (Value, String)> = BTreeMap::new();
        let tables = [
            ("resource".to_string(), Some(&self.common)),
            (role.to_string(), self.roles.get(role)),
            (format!("node.{node}"), Some(own)),
        ];
        for (name, t) in tables {
            for (k, v) in t.into_iter().flatten() {
                merged.insert(k.clone(), (v.clone(), name.clone()));
            }
        }
        // The pair's addresses.
        if let Some((addr, from)) = merged.remove("address") {
            if role == "secondary" {
                merged.entry("listen".into()).or_insert((addr, from));
            }
        }
        if role == "primary" && !merged.contains_key("secondary") {
            let addr = peer.get("address").ok_or_else(|| {
                anyhow!("{file}: the other node has no `address`: the primary does not know where its secondary listens")
            })?;
            merged.insert("secondary".into(), (addr.clone(), "the other node".into()));
        }
        let mut out = Vec::new();
        for (key, (value, from)) in merged {
            let arg = cmd
                .get_arguments()
                .find(|a| a.get_long() == Some(key.as_str()));
            let Some(arg) = arg else {
                if other
                    .get_arguments()
                    .any(|a| a.get_long() == Some(key.as_str()))
                {
                    continue;
                }
                bail!("{file}: [{from}] {key}: not a setting of lockstep primary or secondary (keys are the daemons' long flag names)");
            };
            let flag = format!("--{key}");
            let takes_value = !matches!(
                arg.get_action(),
                ArgAction::SetTrue | ArgAction::SetFalse | ArgAction::Count
            );
            let repeatable = matches!(arg.get_action(), ArgAction::Append);
            match value {
                Value::Boolean(b) if !takes_value => {
                    if b {
                        out.push(flag);
                    }
                }
                Value::Array(items) if repeatable => {
                    for v in items {
                        out.push(flag.clone());
                        out.push(scalar(&v).ok_or_else(|| {
                            anyhow!("{file}: [{from}] {key}: list items must be strings or numbers")
                        })?);
                    }
                }
                v if takes_value => {
                    out.push(flag);
                    out.push(scalar(&v).ok_or_else(|| {
                        anyhow!("{file}: [{from}] {key}: takes a string or a number")
                    })?);
                }
                _ => bail!("{file}: [{from}] {key}: a switch: write {key} = true"),
            }
        }
        Ok(out)
    }
}

/// A scalar setting as a flag value.
fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Integer(i) => Some(i.to_string()),
        Value::Float(f) => Some(f.to_string()),
        _ => None,
    }
}

/// `lockstep ROLE … --config FILE --node NAME …` becomes `lockstep ROLE <the file's flags> …`
/// (the command line's own flags after them, so that they win). Other command lines are
/// returned as they are.
pub fn expand(args: Vec<OsString>, root: &clap::Command) -> anyhow::Result<Vec<OsString>> {
    let Some(role) = args.get(1).and_then(|a| a.to_str()).map(str::to_string) else {
        return Ok(args);
    };
    if !ROLES.contains(&role.as_str()) {
        return Ok(args);
    }
    let (mut file, mut node, mut rest) = (None, None, Vec::new());
    let mut it = args.iter().skip(2).cloned();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy().into_owned();
        let mut take = |name: &str| -> anyhow::Result<Option<String>> {
            if s == name {
                let v = it.next().ok_or_else(|| anyhow!("{name} needs a value"))?;
                Ok(Some(v.to_string_lossy().into_owned()))
            } else if let Some(v) = s.strip_prefix(&format!("{name}=")) {
                Ok(Some(v.to_string()))
            } else {
                Ok(None)
            }
        };
        if let Some(v) = take("--config")? {
            file = Some(v);
        } else if let Some(v) = take("--node")? {
            node = Some(v);
        } else {
            rest.push(a);
        }
    }
    let (file, node) = match (file, node) {
        (None, None) => return Ok(args),
        (Some(f), Some(n)) => (f, n),
        (Some(_), None) => bail!("--config needs --node NAME: which node of the resource this is"),
        (None, Some(_)) => bail!("--node needs --config FILE"),
    };
    let flags = Resource::load(Path::new(&file))?.flags(&role, &node, root)?;
    let mut out = vec![args[0].clone(), args[1].clone()];
    out.extend(flags.into_iter().map(OsString::from));
    out.extend(rest);
    Ok(out)
}

/// The `--config` and `--node` flags the daemons' help shows (they are taken out of the
/// command line by [`expand`] before clap parses it).
pub fn with_config_flags(root: clap::Command) -> clap::Command {
    let mut root = root;
    for r in ROLES {
        root = root.mut_subcommand(r, |c| {
            c.args_override_self(true)
                .arg(
                    clap::Arg::new("config")
                        .long("config")
                        .value_name("FILE")
                        .help("Read the settings of this node from a resource file (TOML) both nodes share; flags given here win (`lockstep config check FILE` checks it)"),
                )
                .arg(
                    clap::Arg::new("node")
                        .long("node")
                        .value_name("NAME")
                        .requires("config")
                        .help("Which [node.NAME] of --config this host is"),
                )
        });
    }
    root
}

#[derive(Debug, Args)]
pub struct ConfigArgs {
    #[command(subcommand)]
    command: ConfigCommand,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Check a resource file: both nodes in both roles parse into valid daemon command lines;
    /// print those command lines.
    Check {
        /// The resource file.
        file: PathBuf,
    },
}

/// `lockstep config check FILE`.
pub fn run(a: ConfigArgs, root: &clap::Command) -> anyhow::Result<()> {
    let ConfigCommand::Check { file } = a.command;
    let res = Resource::load(&file)?;
    let mut problems = Vec::new();
    for node in res.node_names() {
        for role in ROLES {
            let flags = match res.flags(role, node, root) {
                Ok(f) => f,
                Err(e) => {
                    problems.push(format!("node {node} as {role}: {e:#}"));
                    continue;
                }
            };
            let line = std::iter::once(format!("lockstep {role}"))
                .chain(flags.iter().map(|f| shell_word(f)))
                .collect::<Vec<_>>()
                .join(" ");
            let argv = ["lockstep".to_string(), role.to_string()]
                .into_iter()
                .chain(flags);
            match root.clone().try_get_matches_from(argv) {
                Ok(_) => println!("{node} as {role}: {line}"),
                Err(e) => problems.push(format!(
                    "node {node} as {role}: {}",
                    e.render().to_string().trim()
                )),
            }
        }
    }
    if problems.is_empty() {
        println!("{}: OK", file.display());
        Ok(())
    } else {
        for p in &problems {
            eprintln!("{p}");
        }
        Err(anyhow!("{}: {} problem(s)", file.display(), problems.len()))
    }
}

/// `w` quoted for a shell when it needs to be.
fn shell_word(w: &str) -> String {
    if !w.is_empty()
        && w.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@+[]".contains(c))
    {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[resource]
size = "64M"
ack = "durable"
checkpoint-interval = "100ms"

[primary]
heartbeat-misses = 7

[secondary]
on-peer-loss = "wait"

[node.alpha]
address = "127.0.0.1:7790"
disk = "/srv/a.img"
control = "/run/a.sock"
export = "127.0.0.1:10809"
direct = true
memory = ["/dev/shm/r0", "/dev/shm/r1"]

[node.beta]
address = "127.0.0.1:7791"
disk = "/srv/b.img"
control = "/run/b.sock"
"#;

    fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("r0.toml");
        std::fs::write(&p, text).unwrap();
        (d, p)
    }

    fn expanded(line: &str) -> anyhow::Result<Vec<String>> {
        let args = line.split_whitespace().map(OsString::from).collect();
        Ok(expand(args, &crate::command())?
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect())
    }

    #[test]
    fn each_node_gets_its_own_settings_and_the_peers_address() {
        let (_d, p) = file(FILE);
        let p = p.display();
        let a = expanded(&format!("lockstep primary --config {p} --node alpha")).unwrap();
        let s = a.join(" ");
        assert!(s.contains("--secondary 127.0.0.1:7791"), "{s}");
        assert!(
            s.contains("--disk /srv/a.img") && s.contains("--direct"),
            "{s}"
        );
        assert!(
            s.contains("--memory /dev/shm/r0 --memory /dev/shm/r1"),
            "{s}"
        );
        assert!(
            s.contains("--heartbeat-misses 7") && !s.contains("on-peer-loss"),
            "{s}"
        );
        assert!(!s.contains("--listen"), "{s}");
        let b = expanded(&format!("lockstep secondary --node beta --config={p}")).unwrap();
        let s = b.join(" ");
        assert!(s.contains("--listen 127.0.0.1:7791"), "{s}");
        assert!(
            s.contains("--on-peer-loss wait") && !s.contains("--ack"),
            "{s}"
        );
        assert!(!s.contains("heartbeat-misses"), "{s}");
    }

    #[test]
    fn flags_on_the_command_line_win() {
        let (_d, p) = file(FILE);
        let a = expanded(&format!(
            "lockstep primary --config {} --node alpha --ack local --disk /x.img",
            p.display()
        ))
        .unwrap();
        let m = crate::command().try_get_matches_from(&a).unwrap();
        let (_, sub) = m.subcommand().unwrap();
        assert_eq!(
            sub.get_one::<std::path::PathBuf>("disk").unwrap(),
            Path::new("/x.img")
        );
        let cli = <crate::Cli as clap::FromArgMatches>::from_arg_matches(&m).unwrap();
        assert!(format!("{cli:?}").contains("ack: Local"), "{cli:?}");
    }

    #[test]
    fn mistakes_are_named() {
        let (_d, p) = file(&FILE.replace("ack =", "akc ="));
        let e = expanded(&format!(
            "lockstep primary --config {} --node alpha",
            p.display()
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("[resource] akc") && e.contains("not a setting"),
            "{e}"
        );
        let (_d, p) = file(FILE);
        let e = expanded(&format!(
            "lockstep primary --config {} --node gamma",
            p.display()
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("no node \"gamma\"") && e.contains("alpha, beta"),
            "{e}"
        );
        let e = expanded(&format!("lockstep primary --config {}", p.display()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--node"), "{e}");
        let (_d, p) = file(&FILE.replace("[node.beta]", "[nodes.beta]"));
        let e = Resource::load(&p).unwrap_err().to_string();
        assert!(e.contains("\"nodes\""), "{e}");
        let (_d, p) = file(&FILE.replace("direct = true", "direct = \"yes\""));
        let e = expanded(&format!(
            "lockstep primary --config {} --node alpha",
            p.display()
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("direct = true"), "{e}");
    }

    #[test]
    fn a_command_line_without_config_is_left_alone() {
        let a = expanded("lockstep status --control /x --node y").unwrap();
        assert_eq!(a.join(" "), "lockstep status --control /x --node y");
    }
}
