//! A small network of Linux network namespaces for fault tests: each host (Redis, a
//! node, the clients) is its own namespace with one veth link to a router namespace,
//! and faults are firewall rules (nftables) on the router: a partition drops packets
//! in both directions without a FIN or a reset, and a lossy link drops a random share
//! of them (`numgen random`). Latency, which needs a queue (the kernel's `netem` qdisc
//! is often missing), comes from the userspace [`crate::proxy::FaultProxy`] instead.
//!
//! ```text
//!   host 1 (10.77.1.2) ──veth── ┐
//!   host 2 (10.77.2.2) ──veth── router (10.77.i.1 each, forwards; the nft rules)
//!   host 3 (10.77.3.2) ──veth── ┘
//! ```
//!
//! Addresses exist only inside the namespaces, so nothing reaches or disturbs the
//! machine's own network, and two test runs never collide: namespace names carry the
//! process id and a counter. Processes run in a host with [`Lab::command`] (`ip netns
//! exec`). The test's own sockets (its WebSocket clients, its HTTP calls) live in a
//! host too: [`Lab::enter`] moves the calling thread into a host's namespace, and every
//! socket and thread it creates afterwards (a tokio runtime built then) is there.
//!
//! Dropping the lab deletes every namespace (links and rules go with them), also when
//! the test panics; namespaces left by a killed test run are deleted by the next lab.
//! Needs root, `ip` (iproute2) and `nft` (nftables); [`Lab::available`] says whether
//! they are there.

use std::fs::File;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

/// Prefix of every namespace a lab creates: `hf<pid>n<lab>r` (router), `…h<i>` (hosts).
const PREFIX: &str = "hf";

/// A fault in force, for [`Lab::heal`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault(u32);

/// One host of the lab.
#[derive(Debug, Clone)]
pub struct Host {
    /// Its name in the test ("redis", "node0", "clients").
    pub name: String,
    /// Its namespace.
    pub ns: String,
    /// Its main address.
    pub addr: Ipv4Addr,
    /// Further addresses added with [`Lab::add_address`].
    pub extra: Vec<Ipv4Addr>,
}

/// The namespaces, their links and the fault rules. See the module doc.
pub struct Lab {
    router: String,
    hosts: Vec<Host>,
    /// Rules in force: (id, nft rule text).
    rules: Mutex<Vec<(u32, String)>>,
    next_rule: AtomicU32,
    /// The namespace the thread that called [`Lab::enter`] came from.
    home: Mutex<Option<File>>,
}

/// The `ip` program (iproute2).
pub fn ip_bin() -> &'static str {
    ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or("ip")
}

fn nft_bin() -> &'static str {
    ["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or("nft")
}

/// Runs `ip args…` and panics with its error output when it fails.
fn ip(args: &[&str]) {
    let out = Command::new(ip_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `nft -f -` in namespace `ns` with `script` on stdin.
fn nft(ns: &str, script: &str) {
    let mut child = Command::new(ip_bin())
        .args(["netns", "exec", ns, nft_bin(), "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run nft");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(script.as_bytes())
        .expect("write the nft script");
    let out = child.wait_with_output().expect("wait for nft");
    assert!(
        out.status.success(),
        "nft in {ns}: {}\n{script}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Deletes the namespaces of labs whose test process is gone (a run killed before its
/// labs could drop).
fn delete_stale() {
    let Ok(out) = Command::new(ip_bin()).args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('n').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new(ip_bin())
                .args(["netns", "del", name])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A list of addresses in nft syntax: `{ a, b }`.
fn set(addrs: &[Ipv4Addr]) -> String {
    let list: Vec<String> = addrs.iter().map(Ipv4Addr::to_string).collect();
    format!("{{ {} }}", list.join(", "))
}

impl Lab {
    /// Whether labs can run here: root, `ip` and `nft`.
    pub fn available() -> bool {
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        let has = |bin: &str, flag: &str| {
            Command::new(bin)
                .arg(flag)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        root && has(ip_bin(), "-V") && has(nft_bin(), "--version")
    }

    /// Creates a router and one host per name, host `i` (from 1) at `10.77.i.2/24`
    /// behind the router's `10.77.i.1`.
    pub fn new(names: &[&str]) -> Lab {
        static LABS: AtomicU32 = AtomicU32::new(0);
        delete_stale();
        let tag = format!(
            "{PREFIX}{}n{}",
            std::process::id(),
            LABS.fetch_add(1, Ordering::Relaxed)
        );
        let router = format!("{tag}r");
        let mut lab = Lab {
            router: router.clone(),
            hosts: Vec::new(),
            rules: Mutex::new(Vec::new()),
            next_rule: AtomicU32::new(1),
            home: Mutex::new(None),
        };
        // From here on, a panic drops `lab`, which deletes what exists so far.
        ip(&["netns", "add", &router]);
        ip(&["-n", &router, "link", "set", "lo", "up"]);
        let forward = Command::new(ip_bin())
            .args([
                "netns",
                "exec",
                &router,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ])
            .status()
            .expect("sysctl");
        assert!(
            forward.success(),
            "could not turn on forwarding in {router}"
        );
        for (i, name) in names.iter().enumerate() {
            let n = i + 1;
            let ns = format!("{tag}h{n}");
            ip(&["netns", "add", &ns]);
            lab.hosts.push(Host {
                name: (*name).to_owned(),
                ns: ns.clone(),
                addr: Ipv4Addr::new(10, 77, n as u8, 2),
                extra: Vec::new(),
            });
            let link = format!("v{n}");
            ip(&[
                "link", "add", &link, "netns", &router, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ]);
            ip(&[
                "-n",
                &router,
                "addr",
                "add",
                &format!("10.77.{n}.1/24"),
                "dev",
                &link,
            ]);
            ip(&["-n", &router, "link", "set", &link, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("10.77.{n}.2/24"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&[
                "-n",
                &ns,
                "route",
                "add",
                "default",
                "via",
                &format!("10.77.{n}.1"),
            ]);
        }
        lab.apply();
        lab
    }

    /// The host called `name`.
    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name} in the lab"))
    }

    /// The main address of host `name`.
    pub fn addr(&self, name: &str) -> Ipv4Addr {
        self.host(name).addr
    }

    /// Every address of host `name`.
    pub fn addrs(&self, name: &str) -> Vec<Ipv4Addr> {
        let h = self.host(name);
        std::iter::once(h.addr)
            .chain(h.extra.iter().copied())
            .collect()
    }

    /// Adds another address to host `name` (`10.77.i.3`, `.4`, …) and returns it: a
    /// source address that rules can single out (the clients' sockets, apart from the
    /// test's own HTTP calls from the same host).
    pub fn add_address(&mut self, name: &str) -> Ipv4Addr {
        let h = self
            .hosts
            .iter_mut()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name} in the lab"));
        let [a, b, c, _] = h.addr.octets();
        let addr = Ipv4Addr::new(a, b, c, 3 + h.extra.len() as u8);
        ip(&[
            "-n",
            &h.ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ]);
        h.extra.push(addr);
        addr
    }

    /// `ip netns exec <host's namespace> program`: a command that runs in host `name`.
    pub fn command(&self, name: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(ip_bin());
        cmd.args(["netns", "exec", &self.host(name).ns])
            .arg(program);
        cmd
    }

    /// Moves the calling thread into host `name`'s namespace: its sockets, the
    /// processes and threads it starts from now on are there. Build the test's tokio
    /// runtime after this. The thread goes back home when the lab drops.
    pub fn enter(&self, name: &str) {
        let target =
            File::open(format!("/run/netns/{}", self.host(name).ns)).expect("open the namespace");
        let mut home = self.home.lock().unwrap_or_else(|e| e.into_inner());
        if home.is_none() {
            *home =
                Some(File::open("/proc/thread-self/ns/net").expect("open this thread's namespace"));
        }
        rustix::thread::move_into_link_name_space(
            target.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .expect("setns into the host's namespace");
    }

    /// Drops every packet between the addresses `a` and `b`, both ways: no FIN, no
    /// reset, connections just go silent (until [`Lab::heal`]).
    pub fn partition(&self, a: &[Ipv4Addr], b: &[Ipv4Addr]) -> Fault {
        self.add(format!(
            "ip saddr {} ip daddr {} drop\nadd rule inet lab faults ip saddr {} ip daddr {} drop",
            set(a),
            set(b),
            set(b),
            set(a)
        ))
    }

    /// Drops `percent` % of the packets between `a` and `b`, at random, both ways.
    pub fn loss(&self, a: &[Ipv4Addr], b: &[Ipv4Addr], percent: u32) -> Fault {
        self.add(format!(
            "ip saddr {sa} ip daddr {sb} numgen random mod 100 < {percent} drop\n\
             add rule inet lab faults ip saddr {sb} ip daddr {sa} numgen random mod 100 < {percent} drop",
            sa = set(a),
            sb = set(b),
        ))
    }

    /// Ends a fault.
    pub fn heal(&self, fault: Fault) {
        self.rules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(id, _)| *id != fault.0);
        self.apply();
    }

    /// Ends every fault.
    pub fn heal_all(&self) {
        self.rules.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.apply();
    }

    fn add(&self, rule: String) -> Fault {
        let id = self.next_rule.fetch_add(1, Ordering::Relaxed);
        self.rules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((id, rule));
        self.apply();
        Fault(id)
    }

    /// Replaces the router's rules with those in force, in one nft transaction.
    fn apply(&self) {
        let mut script = String::from(
            "table inet lab\ndelete table inet lab\ntable inet lab {\n\
             chain faults { type filter hook forward priority 0; policy accept; }\n}\n",
        );
        for (_, rule) in self.rules.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            script.push_str("add rule inet lab faults ");
            script.push_str(rule);
            script.push('\n');
        }
        nft(&self.router, &script);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(home) = self.home.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = rustix::thread::move_into_link_name_space(
                home.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            );
        }
        for ns in self
            .hosts
            .iter()
            .map(|h| h.ns.as_str())
            .chain([self.router.as_str()])
        {
            let _ = Command::new(ip_bin())
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}
