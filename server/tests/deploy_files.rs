//! The deployment files can't silently break: docker-compose.yml is valid for
//! docker-compose, it describes the same topology as `scripts/dev-cluster` (services,
//! ports, environment, the same HAProxy file), both HAProxy configurations are valid
//! with the environment of each place they run, the image's health probe tells a ready
//! node from an unready one, and the Dockerfile has the shape we promise (it cannot be
//! built here: no Docker engine). Dev mode never switches on by accident: the image sets
//! no key and no HERALD_DEV and listens off loopback, so without keys it refuses to start;
//! the compose cluster turns dev mode on explicitly.
//!
//! The validator is Debian's `docker-compose` (1.29, `config` works without an engine);
//! `scripts/test` installs it. A missing validator fails these tests, never skips them.

#[path = "support/haproxy.rs"]
mod haproxy;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use haproxy::workspace;
use herald_server::config::parse_switch;
use herald_testkit::process::{free_port, start_refused, NodeProcess};
use serde_json::{json, Value};

/// Runs a program in the workspace with `env` and no other HERALD_ variable (nor
/// RUST_LOG) of the test's own environment.
fn run(program: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(program);
    cmd.args(args).current_dir(workspace());
    for (key, _) in std::env::vars() {
        if key.starts_with("HERALD_") || key == "RUST_LOG" {
            cmd.env_remove(key);
        }
    }
    cmd.envs(env.iter().copied());
    match cmd.output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && program == "docker-compose" => {
            panic!(
                "docker-compose is missing: apt-get install -y docker-compose (scripts/test \
                 installs it); it validates docker-compose.yml"
            )
        }
        Err(e) => panic!("run {program}: {e}"),
    }
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

#[test]
fn compose_file_is_valid() {
    ok(
        run(
            "docker-compose",
            &["-f", "docker-compose.yml", "config", "-q"],
            &[],
        ),
        "docker-compose config -q",
    );
}

/// docker-compose's resolved configuration (variables substituted, env_file merged).
fn compose_config(env: &[(&str, &str)]) -> Value {
    let yaml = ok(
        run(
            "docker-compose",
            &["-f", "docker-compose.yml", "config"],
            env,
        ),
        "docker-compose config",
    );
    let value: serde_norway::Value = serde_norway::from_str(&yaml).expect("compose YAML");
    serde_json::to_value(value).expect("compose config as JSON")
}

/// `scripts/dev-cluster plan`: service -> key -> value.
fn dev_cluster_plan(env: &[(&str, &str)]) -> BTreeMap<String, BTreeMap<String, String>> {
    let text = ok(
        run("scripts/dev-cluster", &["plan"], env),
        "scripts/dev-cluster plan",
    );
    let mut plan: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for line in text.lines() {
        let (service, rest) = line.split_once(' ').expect("`service key=value`");
        let (key, value) = rest.split_once('=').expect("`key=value`");
        plan.entry(service.into())
            .or_default()
            .insert(key.into(), value.into());
    }
    plan
}

/// A compose port mapping `127.0.0.1:HOST:CONTAINER/tcp` -> (host, container).
fn mapping(spec: &Value) -> (String, String) {
    let spec = spec.as_str().expect("ports in short syntax");
    let spec = spec.trim_end_matches("/tcp");
    let parts: Vec<&str> = spec.split(':').collect();
    assert_eq!(parts.len(), 3, "port {spec}: bind to 127.0.0.1 explicitly");
    assert_eq!(
        parts[0], "127.0.0.1",
        "port {spec}: dev mode must stay local"
    );
    (parts[1].into(), parts[2].into())
}

/// The container port published on `host_port`.
fn container_port(service: &Value, host_port: &str) -> String {
    service["ports"]
        .as_array()
        .expect("published ports")
        .iter()
        .map(mapping)
        .find(|(host, _)| host == host_port)
        .unwrap_or_else(|| panic!("no port published on {host_port}: {service}"))
        .1
}

fn env_of(service: &Value) -> BTreeMap<String, String> {
    service["environment"]
        .as_object()
        .expect("environment")
        .iter()
        .map(|(k, v)| {
            let v = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (k.clone(), v)
        })
        .collect()
}

fn plan_env(plan: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    plan.iter()
        .filter_map(|(k, v)| k.strip_prefix("env.").map(|k| (k.to_owned(), v.clone())))
        .collect()
}

/// Every `${VAR}` a HAProxy configuration expands.
fn haproxy_variables(kind: &str) -> BTreeSet<String> {
    let text = std::fs::read_to_string(haproxy::config_path(kind)).expect("read haproxy cfg");
    let mut vars = BTreeSet::new();
    for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
        let mut rest = line;
        while let Some(start) = rest.find("${") {
            let end = rest[start..].find('}').expect("closing brace") + start;
            vars.insert(rest[start + 2..end].to_owned());
            rest = &rest[end..];
        }
    }
    vars
}

/// Compose and the dev-cluster script, given the same environment, describe the same
/// cluster.
fn assert_agree(env: &[(&str, &str)]) {
    let compose = compose_config(env);
    let services = compose["services"].as_object().expect("services");
    let plan = dev_cluster_plan(env);
    // Services of a profile (`sentinel`) only run when it is asked for.
    let names: BTreeSet<&str> = services
        .iter()
        .filter(|(_, s)| s.get("profiles").is_none())
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(
        names,
        plan.keys().map(String::as_str).collect(),
        "compose and dev-cluster run different services"
    );

    // Redis: the same persistence, published where the script listens.
    let redis = &services["redis"];
    let command: Vec<&str> = redis["command"]
        .as_array()
        .expect("redis command as a list")
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(command[0], "redis-server");
    assert_eq!(
        command[1..].join(" "),
        plan["redis"]["persistence"],
        "redis persistence differs"
    );
    assert!(plan["redis"]["persistence"].contains("--appendonly yes"));
    let redis_port = container_port(redis, &plan["redis"]["port"]);

    // Nodes: the same environment; listen address and Redis URL differ only by where
    // things are (a container port and a service name vs 127.0.0.1 and a local port).
    let mut node_container_ports = BTreeMap::new();
    for node in ["node1", "node2", "node3"] {
        let service = &services[node];
        let p = &plan[node];
        let port = container_port(service, &p["port"]);
        let mut c_env = env_of(service);
        let mut p_env = plan_env(p);
        assert_eq!(
            c_env.remove("HERALD_LISTEN"),
            Some(format!("0.0.0.0:{port}")),
            "{node}: compose listens where it publishes"
        );
        assert_eq!(
            p_env.remove("HERALD_LISTEN"),
            Some(format!("127.0.0.1:{}", p["port"]))
        );
        assert_eq!(
            c_env.remove("HERALD_REDIS_URL"),
            Some(format!("redis://redis:{redis_port}"))
        );
        assert_eq!(
            p_env.remove("HERALD_REDIS_URL"),
            Some(format!("redis://127.0.0.1:{}", plan["redis"]["port"]))
        );
        assert_eq!(c_env, p_env, "{node}: environments differ");
        assert_eq!(c_env["HERALD_NODE_ID"], node);
        assert_eq!(
            c_env["HERALD_PUBLIC_URL"],
            format!("ws://127.0.0.1:{}/ws", p["port"]),
            "{node} must advertise the URL a browser on the host reaches it on"
        );
        assert_eq!(c_env["HERALD_DEV"], "1");
        assert_eq!(
            service["build"]["context"].as_str().map(Path::new),
            Some(workspace().as_path()),
            "{node} is built from this workspace's Dockerfile"
        );
        let health = service["healthcheck"]["test"].to_string();
        assert!(health.contains("readyz-probe"), "{node}: {health}");
        node_container_ports.insert(node, port);
    }

    // HAProxy: the same file, the same variables, pointing at the same nodes.
    let lb = &services["haproxy"];
    let p = &plan["haproxy"];
    let volumes: Vec<&str> = lb["volumes"]
        .as_array()
        .expect("haproxy volumes")
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let config = workspace().join(&p["config"]);
    assert_eq!(
        volumes,
        vec![format!(
            "{}:/usr/local/etc/haproxy/haproxy.cfg:ro",
            config.display()
        )],
        "compose and dev-cluster run different HAProxy files"
    );
    let mut c_env = env_of(lb);
    let p_env = plan_env(p);
    assert_eq!(
        c_env.remove("HERALD_LB_RESOLVER").as_deref(),
        Some("127.0.0.11:53"),
        "compose nodes are found through Docker's DNS"
    );
    assert_eq!(
        c_env.keys().collect::<Vec<_>>(),
        p_env.keys().collect::<Vec<_>>(),
        "HAProxy gets different variables"
    );
    let kind = p["config"]
        .trim_start_matches("deploy/haproxy-")
        .trim_end_matches(".cfg");
    for var in haproxy_variables(kind) {
        assert!(
            var == "HERALD_LB_RESOLVER" || p_env.contains_key(&var),
            "deploy/haproxy-{kind}.cfg expands ${{{var}}}, which neither sets"
        );
    }
    let lb_port = container_port(lb, &p["port"]);
    let stats_port = container_port(lb, &p["stats_port"]);
    assert_eq!(c_env["HERALD_LB_BIND"], format!(":{lb_port}"));
    assert_eq!(p_env["HERALD_LB_BIND"], format!("127.0.0.1:{}", p["port"]));
    assert_eq!(c_env["HERALD_LB_STATS_BIND"], format!(":{stats_port}"));
    assert_eq!(
        p_env["HERALD_LB_STATS_BIND"],
        format!("127.0.0.1:{}", p["stats_port"])
    );
    for (i, node) in ["node1", "node2", "node3"].iter().enumerate() {
        let var = format!("HERALD_NODE{}_ADDR", i + 1);
        assert_eq!(
            c_env[&var],
            format!("{node}:{}", node_container_ports[node])
        );
        assert_eq!(p_env[&var], format!("127.0.0.1:{}", plan[*node]["port"]));
    }
}

#[test]
fn compose_and_dev_cluster_describe_the_same_cluster() {
    assert_agree(&[]);
    let defaults = dev_cluster_plan(&[]);
    assert_eq!(defaults["haproxy"]["port"], "8080");
    assert_eq!(defaults["haproxy"]["config"], "deploy/haproxy-l7.cfg");
    let ports: Vec<&str> = ["node1", "node2", "node3"]
        .iter()
        .map(|n| defaults[*n]["port"].as_str())
        .collect();
    assert_eq!(ports, ["8081", "8082", "8083"]);
}

#[test]
fn compose_and_dev_cluster_follow_the_same_overrides() {
    assert_agree(&[
        ("HERALD_LB", "l4"),
        ("HERALD_LB_PORT", "18080"),
        ("HERALD_LB_STATS_PORT", "18404"),
        ("HERALD_NODE1_PORT", "18081"),
        ("HERALD_NODE2_PORT", "18082"),
        ("HERALD_NODE3_PORT", "18083"),
        ("HERALD_REDIS_PORT", "16390"),
    ]);
}

/// The `sentinel` profile of compose and `HERALD_REDIS=sentinel scripts/dev-cluster`
/// run the same Sentinel topology: the Redis as first primary, a replica of it, three
/// sentinels watching service `herald` with quorum 2; and the node URL the compose file
/// documents names exactly those sentinels.
#[test]
fn compose_sentinel_profile_and_dev_cluster_sentinel_mode_agree() {
    let url = "redis-sentinel://sentinel1:26379,sentinel2:26379,sentinel3:26379/herald";
    let compose = compose_config(&[("HERALD_COMPOSE_REDIS_URL", url)]);
    let services = compose["services"].as_object().expect("services");
    let plan = dev_cluster_plan(&[("HERALD_REDIS", "sentinel")]);
    let names: BTreeSet<&str> = services.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        plan.keys().map(String::as_str).collect(),
        "compose --profile sentinel and dev-cluster sentinel mode run different services"
    );
    let profiled: BTreeSet<&str> = services
        .iter()
        .filter(|(_, s)| s["profiles"] == json!(["sentinel"]))
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(
        profiled,
        BTreeSet::from(["redis-replica", "sentinel1", "sentinel2", "sentinel3"]),
        "only the Sentinel services belong to the profile"
    );
    let replica = services["redis-replica"]["command"].to_string();
    assert!(
        replica.contains(r#""--replicaof","redis","6379""#),
        "{replica}"
    );
    assert_eq!(
        plan["redis-replica"]["replicaof"],
        format!("127.0.0.1 {}", plan["redis"]["port"])
    );
    for s in ["sentinel1", "sentinel2", "sentinel3"] {
        let command = services[s]["command"].to_string();
        assert!(
            command.contains("sentinel monitor herald redis 6379 2"),
            "{command}"
        );
        assert!(command.contains("port 26379"), "{command}");
        assert!(url.contains(&format!("{s}:26379")));
        assert_eq!(
            plan[s]["monitor"],
            format!("herald 127.0.0.1 {} 2", plan["redis"]["port"])
        );
    }
    for node in ["node1", "node2", "node3"] {
        assert_eq!(env_of(&services[node])["HERALD_REDIS_URL"], url);
        let ports: Vec<String> = ["sentinel1", "sentinel2", "sentinel3"]
            .iter()
            .map(|s| format!("127.0.0.1:{}", plan[*s]["port"]))
            .collect();
        assert_eq!(
            plan_env(&plan[node])["HERALD_REDIS_URL"],
            format!("redis-sentinel://{}/herald", ports.join(","))
        );
    }
}

fn haproxy_check(kind: &str, env: &[(&str, &str)]) {
    let config = haproxy::config_path(kind);
    let config = config.to_str().unwrap();
    ok(
        run("haproxy", &["-c", "-q", "-f", config], env),
        &format!("haproxy -c -f {config} with {env:?}"),
    );
}

#[test]
fn haproxy_configs_are_valid_where_they_run() {
    let plan = dev_cluster_plan(&[]);
    let dev_env = plan_env(&plan["haproxy"]);
    let compose = compose_config(&[]);
    let mut compose_env = env_of(&compose["services"]["haproxy"]);
    // The check resolves server names; compose's ("node1") only resolve inside Docker,
    // and a lookup would leave the machine. Same ports, loopback addresses.
    for value in compose_env.values_mut() {
        for node in ["node1", "node2", "node3"] {
            if let Some(port) = value.strip_prefix(&format!("{node}:")) {
                *value = format!("127.0.0.1:{port}");
            }
        }
    }
    for kind in ["l4", "l7"] {
        let env: Vec<(&str, &str)> = dev_env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        haproxy_check(kind, &env);
        let env: Vec<(&str, &str)> = compose_env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        haproxy_check(kind, &env);
        // A variable left unset is an error, not a silent default.
        let out = run(
            "haproxy",
            &[
                "-c",
                "-q",
                "-f",
                haproxy::config_path(kind).to_str().unwrap(),
            ],
            &[],
        );
        assert!(!out.status.success(), "{kind}: started without addresses");
    }
}

#[test]
fn haproxy_maxconn_fits_the_descriptor_limit() {
    for kind in ["l4", "l7"] {
        let text = std::fs::read_to_string(haproxy::config_path(kind)).unwrap();
        for line in text
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("maxconn "))
        {
            let n: u64 = line["maxconn ".len()..].parse().unwrap();
            // Two descriptors per proxied connection, 200 spare, hard limit 20000.
            assert!(n <= (20_000 - 200) / 2, "{kind}: {line}");
        }
    }
}

fn probe(addr: &str) -> bool {
    let out = Command::new(workspace().join("deploy/readyz-probe"))
        .arg(addr)
        .output()
        .expect("run deploy/readyz-probe");
    out.status.success()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_probe_tells_ready_from_unready() {
    let ready = NodeProcess::start("probe-ready", &[]);
    ready.wait_ready(Duration::from_secs(15)).await;
    assert!(probe(&ready.addr.to_string()), "a ready node");

    // A node whose Redis is unreachable runs (healthz) but is not ready (503).
    let nowhere = format!("redis://127.0.0.1:{}", free_port());
    let unready = NodeProcess::start("probe-unready", &[("HERALD_REDIS_URL", &nowhere)]);
    let status = reqwest::get(format!("{}/readyz", unready.http()))
        .await
        .unwrap()
        .status();
    assert_eq!(status, 503);
    assert!(!probe(&unready.addr.to_string()), "a node without Redis");

    assert!(
        !probe(&format!("127.0.0.1:{}", free_port())),
        "nothing listening"
    );
}

/// The Dockerfile's instructions, comments dropped and continuation lines joined.
fn dockerfile_instructions() -> Vec<String> {
    let text = std::fs::read_to_string(workspace().join("Dockerfile")).unwrap();
    text.replace("\\\n", " ")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

/// The environment the runtime stage sets (`ENV K=V [K=V…]`; values without spaces).
fn dockerfile_runtime_env() -> BTreeMap<String, String> {
    let lines = dockerfile_instructions();
    let runtime = lines
        .iter()
        .rposition(|l| l.starts_with("FROM "))
        .expect("a FROM");
    let mut env = BTreeMap::new();
    for l in &lines[runtime..] {
        if let Some(rest) = l.strip_prefix("ENV ") {
            for pair in rest.split_whitespace() {
                let (k, v) = pair.split_once('=').expect("ENV in K=V form");
                env.insert(k.to_owned(), v.trim_matches('"').to_owned());
            }
        }
    }
    env
}

#[test]
fn the_image_does_not_run_in_dev_mode_by_default() {
    let env = dockerfile_runtime_env();
    for var in [
        "HERALD_DEV",
        "HERALD_JWT_SECRET",
        "HERALD_JWT_PUBLIC_KEY_FILE",
        "HERALD_API_KEY",
    ] {
        assert!(
            !env.contains_key(var),
            "the image must not set {var}: {env:?}"
        );
    }
    let lines = dockerfile_instructions();
    for l in lines
        .iter()
        .filter(|l| l.starts_with("ENTRYPOINT") || l.starts_with("CMD ") || l.starts_with("ARG "))
    {
        assert!(
            !l.contains("--dev") && !l.contains("HERALD_DEV"),
            "dev mode in the image: {l}"
        );
    }
    let listen: SocketAddr = env["HERALD_LISTEN"].parse().expect("HERALD_LISTEN");
    assert!(
        !listen.ip().is_loopback(),
        "the container listens on every interface: {listen}"
    );
    // So the image without keys refuses to start: the real binary with the image's
    // environment (port 0, nothing else).
    let mut listen_any_port = listen;
    listen_any_port.set_port(0);
    let listen_any_port = listen_any_port.to_string();
    let mut run_env: Vec<(&str, &str)> = env
        .iter()
        .filter(|(k, _)| k.as_str() != "HERALD_LISTEN")
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    run_env.push(("HERALD_LISTEN", &listen_any_port));
    let refusal = start_refused(&run_env);
    assert_eq!(refusal.status.code(), Some(2), "{refusal:?}");
    assert!(
        refusal.stderr.contains("HERALD_JWT_SECRET") && refusal.stderr.contains("HERALD_API_KEY"),
        "{refusal:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_turns_dev_mode_on_explicitly() {
    let compose = compose_config(&[]);
    let services = compose["services"].as_object().expect("services");
    for node in ["node1", "node2", "node3"] {
        let env = env_of(&services[node]);
        assert_eq!(
            parse_switch(&env["HERALD_DEV"]),
            Ok(true),
            "{node}: HERALD_DEV must turn dev mode on explicitly: {env:?}"
        );
        let listen: SocketAddr = env["HERALD_LISTEN"].parse().unwrap();
        assert!(!listen.ip().is_loopback(), "{node}: {listen}");
    }
    // And a node with that environment (its keys are short), on every interface, runs in
    // dev mode. Redis is left out: /dev/token does not need it.
    let env = env_of(&services["node1"]);
    let listen = format!("0.0.0.0:{}", free_port());
    let mut run_env: Vec<(&str, &str)> = env
        .iter()
        .filter(|(k, _)| !["HERALD_LISTEN", "HERALD_REDIS_URL"].contains(&k.as_str()))
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    run_env.push(("HERALD_LISTEN", &listen));
    let n = NodeProcess::start("compose-dev", &run_env);
    let status = reqwest::get(format!("{}/dev/token?user=alice", n.http()))
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200);
}

#[test]
fn dockerfile_builds_a_slim_non_root_image_with_a_health_probe() {
    let lines = dockerfile_instructions();
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    let froms: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert_eq!(froms.len(), 2, "build stage and runtime stage: {froms:?}");
    assert!(froms[0].starts_with("FROM rust:") && froms[0].ends_with(" AS build"));
    assert_eq!(froms[1], "FROM debian:bookworm-slim");
    let runtime: Vec<&str> = lines
        .iter()
        .copied()
        .skip_while(|l| *l != froms[1])
        .collect();
    assert!(lines
        .iter()
        .any(|l| l.starts_with("RUN cargo build --release --locked -p herald-server")));
    let user = runtime
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("the runtime stage sets USER");
    assert!(
        !user.starts_with("root") && !user.starts_with('0'),
        "USER {user}"
    );
    let health = runtime
        .iter()
        .find(|l| l.starts_with("HEALTHCHECK "))
        .expect("HEALTHCHECK");
    assert!(health.contains("/usr/local/bin/readyz-probe"), "{health}");
    assert!(runtime.contains(&"COPY deploy/readyz-probe /usr/local/bin/readyz-probe"));

    // What the stages copy from the build context exists and is not ignored.
    let ignore = std::fs::read_to_string(workspace().join(".dockerignore")).unwrap();
    let ignored: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for needed in [
        "Cargo.toml",
        "Cargo.lock",
        "server",
        "shared",
        "deploy/readyz-probe",
    ] {
        assert!(workspace().join(needed).exists(), "{needed}");
        assert!(
            !ignored.iter().any(|i| i.trim_end_matches('/') == needed
                || needed.starts_with(&format!("{}/", i.trim_end_matches('/')))),
            ".dockerignore drops {needed}"
        );
    }
    assert!(
        ignored.contains(&"target/"),
        "the build context must not carry target/"
    );
}
