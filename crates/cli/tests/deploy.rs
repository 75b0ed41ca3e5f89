//! `deploy/kubernetes/` is what a platform team applies, so it is checked like code:
//!
//! * the `InferencePool` and `HTTPRoute` against the CRD schemas vendored from the releases the
//!   manifests target (GAIE v1.5.0, Gateway API v1.4.0; `deploy/kubernetes/crds/`), with no
//!   field the schema does not declare (what `kubectl apply`'s strict field validation
//!   refuses), plus the InferencePool CRD's CEL rules that apply here;
//! * the endpoint picker's `EndpointPickerConfig` against GAIE v1.5.0's plugin types;
//! * the `modu` containers' arguments against the binary's own parser (`modu ARGS --help` fails
//!   on an unknown flag or a bad value), the pulled model against `modu list`;
//! * probes against modu's routes (a running server answers them), the drain timing against
//!   the grace period, and names, labels, ports and volumes across the objects.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every YAML document of a file, as JSON values.
fn docs(rel: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            let v: serde_yaml::Value =
                serde::Deserialize::deserialize(d).unwrap_or_else(|e| panic!("{rel}: {e}"));
            serde_json::to_value(v).unwrap()
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn manifests() -> Vec<Value> {
    let mut v = docs("deploy/kubernetes/modu.yaml");
    v.extend(docs("deploy/kubernetes/inferencepool.yaml"));
    v
}

fn find<'a>(all: &'a [Value], kind: &str, name: &str) -> &'a Value {
    all.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v}"))
}

/// The `openAPIV3Schema` of `version` in a vendored CRD.
fn crd_schema(file: &str, version: &str) -> Value {
    let crd = &docs(&format!("deploy/kubernetes/crds/{file}"))[0];
    crd["spec"]["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == version)
        .unwrap_or_else(|| panic!("{file} has no version {version}"))["schema"]["openAPIV3Schema"]
        .clone()
}

/// Fields of `obj` that `schema` does not declare (`metadata` is the API server's own).
fn unknown_fields(schema: &Value, obj: &Value, path: &str, out: &mut Vec<String>) {
    match obj {
        Value::Object(m) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let open = schema.get("additionalProperties").is_some()
                || schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
            for (k, v) in m {
                let p = format!("{path}.{k}");
                match props.and_then(|p| p.get(k)) {
                    Some(s) if k != "metadata" => unknown_fields(s, v, &p, out),
                    Some(_) => {}
                    None if open => {}
                    None => out.push(p),
                }
            }
        }
        Value::Array(a) => {
            if let Some(items) = schema.get("items") {
                for (i, v) in a.iter().enumerate() {
                    unknown_fields(items, v, &format!("{path}[{i}]"), out);
                }
            }
        }
        _ => {}
    }
}

fn check_against_crd(obj: &Value, file: &str, version: &str) {
    let schema = crd_schema(file, version);
    let validator = jsonschema::validator_for(&schema).expect("CRD schema compiles");
    let errors: Vec<String> = validator
        .iter_errors(obj)
        .map(|e| format!("{}: {e}", e.instance_path))
        .collect();
    assert!(
        errors.is_empty(),
        "{} {} against {file}:\n{}",
        obj["kind"],
        obj["metadata"]["name"],
        errors.join("\n")
    );
    let mut unknown = Vec::new();
    unknown_fields(&schema, obj, "", &mut unknown);
    assert!(
        unknown.is_empty(),
        "{} {}: fields the CRD does not declare: {unknown:?}",
        obj["kind"],
        obj["metadata"]["name"]
    );
}

/// The schema check is not vacuous: broken objects fail it.
#[test]
fn the_schema_check_catches_broken_objects() {
    let all = manifests();
    let pool = find(&all, "InferencePool", "modu").clone();
    let file = "inference.networking.k8s.io_inferencepools.yaml";
    let schema = crd_schema(file, "v1");
    let validator = jsonschema::validator_for(&schema).unwrap();
    let mut no_ports = pool.clone();
    no_ports["spec"]
        .as_object_mut()
        .unwrap()
        .remove("targetPorts");
    assert!(!validator.is_valid(&no_ports));
    let mut bad_port = pool.clone();
    bad_port["spec"]["targetPorts"][0]["number"] = Value::from(70000);
    assert!(!validator.is_valid(&bad_port));
    let mut bad_mode = pool.clone();
    bad_mode["spec"]["endpointPickerRef"]["failureMode"] = Value::from("Sometimes");
    assert!(!validator.is_valid(&bad_mode));
    let mut typo = pool;
    typo["spec"]["endpointPickerRef"]["prot"] = Value::from(9002);
    let mut unknown = Vec::new();
    unknown_fields(&schema, &typo, "", &mut unknown);
    assert_eq!(unknown, vec![".spec.endpointPickerRef.prot".to_string()]);
}

#[test]
fn inference_pool_and_route_match_the_vendored_crds() {
    let all = manifests();
    let pool = find(&all, "InferencePool", "modu");
    assert_eq!(pool["apiVersion"], "inference.networking.k8s.io/v1");
    check_against_crd(
        pool,
        "inference.networking.k8s.io_inferencepools.yaml",
        "v1",
    );
    // The CRD's CEL rules: a Service reference needs a port; port numbers are unique.
    let epp = &pool["spec"]["endpointPickerRef"];
    let kind = epp["kind"].as_str().unwrap_or("Service");
    assert!(kind != "Service" || epp["port"]["number"].is_u64());
    let ports: Vec<u64> = pool["spec"]["targetPorts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["number"].as_u64().unwrap())
        .collect();
    let mut uniq = ports.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(
        uniq.len(),
        ports.len(),
        "target port numbers must be unique"
    );

    let route = find(&all, "HTTPRoute", "modu");
    assert_eq!(route["apiVersion"], "gateway.networking.k8s.io/v1");
    check_against_crd(route, "gateway.networking.k8s.io_httproutes.yaml", "v1");
    for rule in route["spec"]["rules"].as_array().unwrap() {
        for b in rule["backendRefs"].as_array().unwrap() {
            assert_eq!(b["group"], "inference.networking.k8s.io");
            assert_eq!(b["kind"], "InferencePool");
            assert_eq!(b["name"], pool["metadata"]["name"]);
        }
        // Only the API is routed: /metrics (public for the picker) stays inside the cluster.
        for m in rule["matches"].as_array().unwrap() {
            assert_eq!(
                m["path"]["value"], "/v1",
                "route only /v1 through the gateway"
            );
        }
    }
}

/// Plugin types GAIE v1.5.0 registers (`git grep 'Type = "' v1.5.0 -- pkg/epp`), the ones an
/// `EndpointPickerConfig` may name.
const GAIE_V1_5_0_PLUGIN_TYPES: &[&str] = &[
    "approx-prefix-cache-producer",
    "concurrency-detector",
    "core-metrics-extractor",
    "destination-endpoint-served-verifier",
    "edf-ordering-policy",
    "endpoint-notification-source",
    "eviction-priority-then-time-ordering",
    "eviction-sheddable-filter",
    "fcfs-ordering-policy",
    "global-strict-fairness-policy",
    "header-based-testing-filter",
    "inflight-load-producer",
    "kv-cache-utilization-scorer",
    "latency-scorer",
    "latency-slo-admitter",
    "lora-affinity-scorer",
    "max-score-picker",
    "metrics-data-source",
    "openai-parser",
    "passthrough-parser",
    "predicted-latency-producer",
    "predicted-latency-scorer",
    "prefix-cache-affinity-filter",
    "prefix-cache-scorer",
    "queue-scorer",
    "random-picker",
    "request-attribute-reporter",
    "round-robin-fairness-policy",
    "running-requests-size-scorer",
    "single-profile-handler",
    "slo-deadline-ordering-policy",
    "slo-headroom-tier-filter",
    "static-usage-limit-policy",
    "token-load-scorer",
    "utilization-detector",
    "vllmgrpc-parser",
    "weighted-random-picker",
];

#[test]
fn endpoint_picker_is_configured_for_modu_and_lora_affinity() {
    let all = manifests();
    let pool = find(&all, "InferencePool", "modu");
    let epp_ref = &pool["spec"]["endpointPickerRef"];
    let epp_name = str_of(&epp_ref["name"]);
    // The picker's Service carries the port the pool names.
    let svc = find(&all, "Service", epp_name);
    assert!(svc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["port"] == epp_ref["port"]["number"]));
    let dep = find(&all, "Deployment", epp_name);
    let pod = &dep["spec"]["template"];
    for (k, v) in svc["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&pod["metadata"]["labels"][k], v, "EPP Service selector");
    }
    let c = &pod["spec"]["containers"][0];
    assert!(
        str_of(&c["image"]).ends_with(":v1.5.0"),
        "EPP image of the targeted release"
    );
    let args: Vec<&str> = c["args"].as_array().unwrap().iter().map(str_of).collect();
    let arg = |flag: &str| {
        let i = args
            .iter()
            .position(|a| *a == flag)
            .unwrap_or_else(|| panic!("no {flag}"));
        args[i + 1]
    };
    assert_eq!(arg("--pool-name"), str_of(&pool["metadata"]["name"]));
    assert_eq!(arg("--pool-group"), "inference.networking.k8s.io");
    assert!(c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["containerPort"] == epp_ref["port"]["number"]));
    // RBAC: the picker's service account may watch pods and pools.
    let sa = str_of(&pod["spec"]["serviceAccountName"]);
    let binding = all
        .iter()
        .find(|d| d["kind"] == "RoleBinding" && d["subjects"][0]["name"] == sa)
        .expect("a RoleBinding for the picker");
    let role = find(&all, "Role", str_of(&binding["roleRef"]["name"]));
    let rules = role["rules"].as_array().unwrap();
    for res in ["pods", "inferencepools"] {
        assert!(
            rules.iter().any(|r| r["resources"]
                .as_array()
                .unwrap()
                .contains(&Value::from(res))
                && r["verbs"]
                    .as_array()
                    .unwrap()
                    .contains(&Value::from("watch"))),
            "the picker's role must watch {res}"
        );
    }
    // Its configuration file comes from the ConfigMap mounted where --config-file points.
    let config_file = arg("--config-file");
    let mount = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| config_file.starts_with(str_of(&m["mountPath"])))
        .expect("--config-file lies on a mounted volume");
    let vol = pod["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    let cm = find(&all, "ConfigMap", str_of(&vol["configMap"]["name"]));
    let key = config_file.rsplit('/').next().unwrap();
    let text = str_of(&cm["data"][key]);
    let cfg: Value =
        serde_json::to_value(serde_yaml::from_str::<serde_yaml::Value>(text).unwrap()).unwrap();
    assert_eq!(cfg["apiVersion"], "inference.networking.x-k8s.io/v1alpha1");
    assert_eq!(cfg["kind"], "EndpointPickerConfig");
    let plugins = cfg["plugins"].as_array().unwrap();
    let mut refs = Vec::new();
    for p in plugins {
        let ty = str_of(&p["type"]);
        assert!(
            GAIE_V1_5_0_PLUGIN_TYPES.contains(&ty),
            "unknown plugin type {ty}"
        );
        refs.push(p["name"].as_str().unwrap_or(ty).to_string());
        for k in p.as_object().unwrap().keys() {
            assert!(
                ["name", "type", "parameters"].contains(&k.as_str()),
                "plugin field {k}"
            );
        }
    }
    for top in cfg.as_object().unwrap().keys() {
        assert!(
            [
                "apiVersion",
                "kind",
                "featureGates",
                "plugins",
                "schedulingProfiles",
                "saturationDetector",
                "dataLayer",
                "flowControl",
                "parser"
            ]
            .contains(&top.as_str()),
            "EndpointPickerConfig field {top}"
        );
    }
    let profile = &cfg["schedulingProfiles"][0];
    let used: Vec<&str> = profile["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| str_of(&p["pluginRef"]))
        .collect();
    for u in &used {
        assert!(refs.iter().any(|r| r == u), "pluginRef {u} names no plugin");
    }
    for needed in [
        "queue-scorer",
        "kv-cache-utilization-scorer",
        "lora-affinity-scorer",
    ] {
        assert!(
            used.contains(&needed),
            "the default profile must score with {needed}"
        );
    }
    // The metrics data source reads modu's /metrics.
    let ds = plugins
        .iter()
        .find(|p| p["type"] == "metrics-data-source")
        .expect("metrics-data-source");
    assert_eq!(ds["parameters"]["path"], "/metrics");
}

/// `modu ARGS --help` succeeds only if every flag exists and every value parses.
fn modu_accepts(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_modu"))
        .args(args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "modu {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn model_servers_are_wired_as_modu_expects() {
    let all = manifests();
    let dep = find(&all, "Deployment", "modu");
    let pod = &dep["spec"]["template"];
    let labels = &pod["metadata"]["labels"];
    for sel in [
        &dep["spec"]["selector"]["matchLabels"],
        &find(&all, "Service", "modu")["spec"]["selector"],
        &find(&all, "InferencePool", "modu")["spec"]["selector"]["matchLabels"],
    ] {
        for (k, v) in sel.as_object().unwrap() {
            assert_eq!(&labels[k], v, "selector {k} must match the pod's labels");
        }
    }
    let c = &pod["spec"]["containers"][0];
    let args: Vec<&str> = c["args"].as_array().unwrap().iter().map(str_of).collect();
    assert_eq!(args[0], "serve");
    modu_accepts(&args);
    let arg = |flag: &str| {
        let i = args
            .iter()
            .position(|a| *a == flag)
            .unwrap_or_else(|| panic!("no {flag}"));
        args[i + 1]
    };
    // Port: the container's, the pool's target port and the Service's target.
    let port: u64 = arg("--port").parse().unwrap();
    let cport = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["containerPort"] == port)
        .expect("the container exposes --port");
    let pool = find(&all, "InferencePool", "modu");
    assert_eq!(pool["spec"]["targetPorts"][0]["number"], port);
    let svc = find(&all, "Service", "modu");
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], cport["name"]);
    assert_ne!(arg("--host"), "127.0.0.1", "reachable from the pod network");
    // Keys configured (a services config), so the Host guard of an open server is off.
    let config = arg("--config");

    // Volumes: every mount is declared, the config and the module directory are mounted.
    let volumes = pod["spec"]["volumes"].as_array().unwrap();
    let mount_of = |path: &str| {
        c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| path.starts_with(str_of(&m["mountPath"])))
            .unwrap_or_else(|| panic!("{path} is on no mounted volume"))
    };
    for m in c["volumeMounts"].as_array().unwrap() {
        assert!(
            volumes.iter().any(|v| v["name"] == m["name"]),
            "volume {}",
            m["name"]
        );
    }
    let config_vol = volumes
        .iter()
        .find(|v| v["name"] == mount_of(config)["name"])
        .unwrap();
    assert!(
        config_vol["secret"]["secretName"].is_string(),
        "the config is a Secret"
    );
    let modules = mount_of(arg("--module-dir"));
    let modules_vol = volumes
        .iter()
        .find(|v| v["name"] == modules["name"])
        .unwrap();
    let claim = str_of(&modules_vol["persistentVolumeClaim"]["claimName"]);
    find(&all, "PersistentVolumeClaim", claim);
    // The model cache: MODU_HOME on a volume the init container fills with `modu pull`.
    let home = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "MODU_HOME")
        .expect("MODU_HOME");
    mount_of(str_of(&home["value"]));
    let init = &pod["spec"]["initContainers"][0];
    let init_args: Vec<&str> = init["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(str_of)
        .collect();
    assert_eq!(init_args[0], "pull");
    modu_accepts(&init_args);
    assert_eq!(
        init_args[1],
        arg("--model"),
        "the init container pulls the served model"
    );
    assert_eq!(init["env"], c["env"], "the same MODU_HOME");
    let list = Command::new(env!("CARGO_BIN_EXE_modu"))
        .arg("list")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&list.stdout).contains(init_args[1]),
        "a known model"
    );

    // Probes: readiness on /health, liveness and startup on /live, by the named port.
    let probe = |k: &str| &c[k]["httpGet"];
    assert_eq!(probe("readinessProbe")["path"], "/health");
    assert_eq!(probe("livenessProbe")["path"], "/live");
    assert_eq!(probe("startupProbe")["path"], "/live");
    for k in ["readinessProbe", "livenessProbe", "startupProbe"] {
        assert_eq!(probe(k)["port"], cport["name"], "{k} port");
    }
    // Drain: the preStop pause plus --drain-timeout fit in the grace period, and liveness
    // (whose probes fail while the drained server accepts no connections) outlasts both.
    let drain: f64 = arg("--drain-timeout").parse().unwrap();
    let pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_f64()
        .unwrap();
    let grace = pod["spec"]["terminationGracePeriodSeconds"]
        .as_f64()
        .unwrap();
    assert!(
        pre_stop + drain < grace,
        "{pre_stop} + {drain} s must fit in {grace} s"
    );
    // The picker waits for the longest grace period of the pool's pods.
    let epp = find(
        &all,
        "Deployment",
        str_of(&pool["spec"]["endpointPickerRef"]["name"]),
    );
    assert!(
        epp["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            .as_f64()
            .unwrap()
            >= grace
    );
}

/// The probe paths are modu's: a running server answers them without a key (with keys
/// configured, as in the deployment), and `/metrics` too once `[metrics] public = true`.
#[test]
fn probe_and_metrics_paths_answer_on_a_keyed_server() {
    let dir = std::env::temp_dir().join(format!("modu-deploy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("modu.toml");
    std::fs::write(
        &cfg,
        format!(
            "database = \"{}\"\n\n[metrics]\npublic = true\n\n[services.a]\nkey_hashes = [\"sha256:{}\"]\n",
            dir.join("usage.db").display(),
            "0".repeat(64)
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_modu"))
        .args([
            "serve",
            "-m",
            "gemma-3-270m",
            "--port",
            "0",
            "--parallel",
            "1",
            "--ctx",
            "256",
        ])
        .arg("--config")
        .arg(&cfg)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The bound address is printed once the server listens.
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(i) = line.find("http://") {
                let addr: String = line[i..].split_whitespace().next().unwrap().to_string();
                let _ = tx.send(addr.trim_end_matches("/v1").to_string());
            }
        }
    });
    let base = rx
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("modu serve printed its address");
    let get = |path: &str| match ureq::get(&format!("{base}{path}")).call() {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(c, r)) => (c, r.into_string().unwrap()),
        Err(e) => panic!("{path}: {e}"),
    };
    let docs = manifests();
    let c = &find(&docs, "Deployment", "modu")["spec"]["template"]["spec"]["containers"][0];
    for k in ["readinessProbe", "livenessProbe", "startupProbe"] {
        let path = str_of(&c[k]["httpGet"]["path"]);
        assert_eq!(get(path).0, 200, "{k} {path}");
    }
    let (st, body) = get("/metrics");
    assert_eq!(st, 200);
    for name in [
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
        "vllm:lora_requests_info",
    ] {
        assert!(body.contains(name), "{name} missing");
    }
    assert_eq!(get("/v1/usage").0, 401, "the API still needs a key");
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
