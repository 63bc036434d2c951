//! Golden tests of the injector: each input pod in `tests/fixtures/pods/` goes through
//! `mutate` inside an AdmissionReview, the returned JSON Patch is applied with the
//! `json-patch` crate, and the result must equal `tests/fixtures/expected/<case>.json`.
//!
//! After a deliberate change of the injected objects, rewrite the expected files with
//! `PORTCULLIS_UPDATE_GOLDEN=1 cargo test -p portcullis-inject --test golden` and review the
//! diff before committing it.

use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use portcullis_inject::{InjectorConfig, InjectorOptions, KubernetesVersion, mutate};
use serde_json::{Value, json};

const UPDATE_VARIABLE: &str = "PORTCULLIS_UPDATE_GOLDEN";

/// The sidecar settings a case runs with.
#[derive(Clone, Copy)]
enum Setup {
    /// Kubernetes 1.30: a native sidecar with every optional volume.
    Native,
    /// Kubernetes 1.28: a regular container with every optional volume.
    Legacy,
    /// Kubernetes 1.30 without any optional volume: no policy ConfigMap (a bundle from
    /// elsewhere, such as the image), no Vault token, no spool and no signing key.
    Minimal,
}

struct Case {
    name: &'static str,
    pod: &'static str,
    setup: Setup,
}

const INJECTED_CASES: &[Case] = &[
    Case {
        name: "plain-native",
        pod: "plain",
        setup: Setup::Native,
    },
    Case {
        name: "plain-legacy",
        pod: "plain",
        setup: Setup::Legacy,
    },
    Case {
        name: "plain-minimal",
        pod: "plain",
        setup: Setup::Minimal,
    },
    Case {
        name: "init-containers-native",
        pod: "with-init-containers",
        setup: Setup::Native,
    },
    Case {
        name: "init-containers-legacy",
        pod: "with-init-containers",
        setup: Setup::Legacy,
    },
    Case {
        name: "volumes-native",
        pod: "with-volumes",
        setup: Setup::Native,
    },
    Case {
        name: "istio-native",
        pod: "istio-native",
        setup: Setup::Native,
    },
    Case {
        name: "istio-legacy",
        pod: "istio-legacy",
        setup: Setup::Legacy,
    },
];

/// Pods that must come back allowed and without a patch, in both modes.
const UNCHANGED_PODS: &[&str] = &[
    "opted-out-annotation",
    "opted-out-label",
    "already-injected",
    "container-named-portcullis",
];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|error| panic!("reading {} failed: {error}", path.display()));
    serde_json::from_str(&text)
        .unwrap_or_else(|error| panic!("{} is not valid JSON: {error}", path.display()))
}

fn config(setup: Setup) -> InjectorConfig {
    let mut config = InjectorOptions::from_file(&fixtures().join("injector.yaml"))
        .expect("tests/fixtures/injector.yaml is valid")
        .injection;
    let version = |text| Some(KubernetesVersion::parse(text).expect("valid version"));
    match setup {
        Setup::Native => config.kubernetes_version = version("1.30"),
        Setup::Legacy => config.kubernetes_version = version("1.28"),
        Setup::Minimal => {
            config.kubernetes_version = version("1.30");
            config.sidecar.policy_config_map = None;
            config.sidecar.vault_token = None;
            config.sidecar.audit_spool = None;
            config.sidecar.audit_signing_key_secret = None;
        }
    }
    config
}

fn review_of(pod: &Value) -> Value {
    let namespace = pod["metadata"]["namespace"].clone();
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "3a1b6bd2-5f0e-4c37-9f53-2d6c3b7a5e11",
            "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "requestKind": { "group": "", "version": "v1", "kind": "Pod" },
            "requestResource": { "group": "", "version": "v1", "resource": "pods" },
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": { "username": "system:serviceaccount:kube-system:replicaset-controller" },
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": { "apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions" },
        },
    })
}

/// Runs `mutate` and returns the response and the patched pod (the input when no patch).
fn admit(pod: &Value, config: &InjectorConfig) -> (Value, Value) {
    let answer = mutate(&review_of(pod), config);
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    let response = answer["response"].clone();
    assert_eq!(response["uid"], "3a1b6bd2-5f0e-4c37-9f53-2d6c3b7a5e11");
    assert_eq!(response["allowed"], true, "{response}");
    assert_eq!(response.get("warnings"), None, "{response}");

    let Some(patch) = response.get("patch") else {
        assert_eq!(response.get("patchType"), None);
        return (response, pod.clone());
    };
    assert_eq!(response["patchType"], "JSONPatch");
    let bytes = BASE64
        .decode(patch.as_str().expect("patch is a string"))
        .expect("patch is base64");
    let patch: json_patch::Patch = serde_json::from_slice(&bytes).expect("patch is a JSON Patch");
    let mut patched = pod.clone();
    json_patch::patch(&mut patched, &patch)
        .unwrap_or_else(|error| panic!("the patch does not apply: {error}"));
    (response, patched)
}

#[test]
fn injected_pods_match_expected_fixtures() {
    let update = std::env::var(UPDATE_VARIABLE).is_ok_and(|value| value == "1");

    for case in INJECTED_CASES {
        let pod = read_json(&fixtures().join("pods").join(format!("{}.json", case.pod)));
        let (response, patched) = admit(&pod, &config(case.setup));
        assert!(response.get("patch").is_some(), "{}: no patch", case.name);

        let expected_path = fixtures()
            .join("expected")
            .join(format!("{}.json", case.name));
        if update {
            let text = serde_json::to_string_pretty(&patched).expect("serializing JSON failed");
            std::fs::create_dir_all(expected_path.parent().expect("has a parent"))
                .expect("creating tests/fixtures/expected failed");
            std::fs::write(&expected_path, format!("{text}\n"))
                .expect("writing the fixture failed");
            continue;
        }
        let expected = read_json(&expected_path);
        assert_eq!(
            patched,
            expected,
            "{}: the patched pod differs from {}; rerun with {UPDATE_VARIABLE}=1 after a deliberate change",
            case.name,
            expected_path.display()
        );
    }
}

#[test]
fn skipped_pods_are_allowed_without_patch() {
    for name in UNCHANGED_PODS {
        let pod = read_json(&fixtures().join("pods").join(format!("{name}.json")));
        for setup in [Setup::Native, Setup::Legacy] {
            let (response, patched) = admit(&pod, &config(setup));
            assert_eq!(response.get("patch"), None, "{name}");
            assert_eq!(patched, pod, "{name}");
        }
    }
}

#[test]
fn injected_pod_is_not_injected_twice() {
    for case in INJECTED_CASES {
        let pod = read_json(&fixtures().join("pods").join(format!("{}.json", case.pod)));
        let config = config(case.setup);
        let (_, patched) = admit(&pod, &config);

        let (second, _) = admit(&patched, &config);
        assert_eq!(second.get("patch"), None, "{}: injected twice", case.name);

        // A pod whose marker annotation was dropped is still recognized by its container.
        let mut unmarked = patched.clone();
        unmarked["metadata"]["annotations"]
            .as_object_mut()
            .expect("annotations exist after injection")
            .remove("portcullis.io/injected");
        let (third, _) = admit(&unmarked, &config);
        assert_eq!(
            third.get("patch"),
            None,
            "{}: injected twice without the annotation",
            case.name
        );
    }
}

#[test]
fn native_sidecar_comes_first_and_leaves_istio_alone() {
    let pod = read_json(&fixtures().join("pods/istio-native.json"));
    let (_, patched) = admit(&pod, &config(Setup::Native));

    let init_names: Vec<&str> = patched["spec"]["initContainers"]
        .as_array()
        .expect("initContainers")
        .iter()
        .map(|container| container["name"].as_str().expect("name"))
        .collect();
    assert_eq!(init_names, ["portcullis", "istio-init", "istio-proxy"]);
    assert_eq!(
        patched["spec"]["initContainers"][0]["restartPolicy"],
        "Always"
    );
    assert_eq!(
        patched["spec"]["initContainers"][1],
        pod["spec"]["initContainers"][0]
    );
    assert_eq!(
        patched["spec"]["initContainers"][2],
        pod["spec"]["initContainers"][1]
    );
    assert_eq!(patched["spec"]["containers"], pod["spec"]["containers"]);
}

#[test]
fn legacy_sidecar_is_appended_and_leaves_istio_alone() {
    let pod = read_json(&fixtures().join("pods/istio-legacy.json"));
    let (_, patched) = admit(&pod, &config(Setup::Legacy));

    let names: Vec<&str> = patched["spec"]["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .map(|container| container["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["reviews", "istio-proxy", "portcullis"]);
    assert_eq!(patched["spec"]["containers"][2].get("restartPolicy"), None);
    assert_eq!(
        patched["spec"]["initContainers"],
        pod["spec"]["initContainers"]
    );
}
