use super::*;

use crate::config::{InjectorOptions, SidecarTemplate};

fn config(failure_policy: FailurePolicy, kubernetes_version: Option<&str>) -> InjectorConfig {
    let yaml = r#"
tls: { cert_file: a, key_file: b }
injection:
  sidecar: { image: portcullis:test, config_map: portcullis-sidecar, policy_config_map: portcullis-policy }
"#;
    let mut config = InjectorOptions::from_yaml(yaml)
        .expect("test options are valid")
        .injection;
    config.failure_policy = failure_policy;
    config.kubernetes_version = kubernetes_version
        .map(|text| crate::KubernetesVersion::parse(text).expect("valid version"));
    config
}

fn review_of(object: Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "namespace": "shop",
            "operation": "CREATE",
            "object": object,
        },
    })
}

fn simple_pod() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": "web", "namespace": "shop" },
        "spec": { "containers": [{ "name": "app", "image": "app:1" }] },
    })
}

/// Decodes `response.patch`, applies it to `object` and returns the result.
fn apply_response(answer: &Value, object: &Value) -> Value {
    let response = &answer["response"];
    assert_eq!(response["patchType"], "JSONPatch");
    let bytes = BASE64
        .decode(response["patch"].as_str().expect("patch is a string"))
        .expect("patch is base64");
    let patch: json_patch::Patch = serde_json::from_slice(&bytes).expect("patch is a JSON Patch");
    let mut patched = object.clone();
    json_patch::patch(&mut patched, &patch).expect("patch applies");
    patched
}

fn assert_allowed_without_patch(answer: &Value) {
    let response = answer["response"]
        .as_object()
        .expect("response is an object");
    assert_eq!(response.get("allowed"), Some(&Value::Bool(true)));
    assert_eq!(response.get("patch"), None);
    assert_eq!(response.get("patchType"), None);
}

#[test]
fn response_echoes_uid_and_envelope() {
    let answer = mutate(
        &review_of(simple_pod()),
        &config(FailurePolicy::Ignore, None),
    );

    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(
        answer["response"]["uid"],
        "705ab4f5-6393-11e8-b7cc-42010a800002"
    );
    assert_eq!(answer["response"]["allowed"], true);
}

#[test]
fn patch_adds_annotation_with_escaped_key() {
    let mut pod = simple_pod();
    pod["metadata"]["annotations"] = json!({ "team": "shop" });

    let answer = mutate(
        &review_of(pod.clone()),
        &config(FailurePolicy::Ignore, None),
    );
    let bytes = BASE64
        .decode(
            answer["response"]["patch"]
                .as_str()
                .expect("patch is a string"),
        )
        .expect("patch is base64");
    let operations: Vec<Value> = serde_json::from_slice(&bytes).expect("patch is JSON");

    assert_eq!(
        operations[0],
        json!({ "op": "add", "path": "/metadata/annotations/portcullis.io~1injected", "value": "true" })
    );
    let patched = apply_response(&answer, &pod);
    assert_eq!(
        patched["metadata"]["annotations"],
        json!({ "team": "shop", "portcullis.io/injected": "true" })
    );
}

#[test]
fn null_annotations_and_volumes_are_replaced() {
    let mut pod = simple_pod();
    pod["metadata"]["annotations"] = Value::Null;
    pod["spec"]["volumes"] = Value::Null;

    let answer = mutate(
        &review_of(pod.clone()),
        &config(FailurePolicy::Ignore, None),
    );
    let patched = apply_response(&answer, &pod);

    assert_eq!(
        patched["metadata"]["annotations"],
        json!({ "portcullis.io/injected": "true" })
    );
    assert_eq!(
        patched["spec"]["volumes"],
        json!([
            { "name": "portcullis-config", "configMap": { "name": "portcullis-sidecar" } },
            { "name": "portcullis-policy", "configMap": { "name": "portcullis-policy" } },
        ])
    );
}

#[test]
fn missing_metadata_is_added() {
    let mut pod = simple_pod();
    pod.as_object_mut()
        .expect("pod is an object")
        .remove("metadata");

    let answer = mutate(
        &review_of(pod.clone()),
        &config(FailurePolicy::Ignore, None),
    );
    let patched = apply_response(&answer, &pod);

    assert_eq!(
        patched["metadata"],
        json!({ "annotations": { "portcullis.io/injected": "true" } })
    );
}

#[test]
fn missing_containers_array_is_added() {
    let pod = json!({ "metadata": {}, "spec": {} });

    let answer = mutate(
        &review_of(pod.clone()),
        &config(FailurePolicy::Ignore, Some("1.28")),
    );
    let patched = apply_response(&answer, &pod);

    let containers = patched["spec"]["containers"]
        .as_array()
        .expect("containers added");
    assert_eq!(containers.len(), 1);
    assert_eq!(containers[0]["name"], "portcullis");
}

#[test]
fn opt_out_value_ignores_case() {
    let mut pod = simple_pod();
    pod["metadata"]["annotations"] = json!({ "portcullis.io/inject": " False " });

    let answer = mutate(&review_of(pod), &config(FailurePolicy::Ignore, None));

    assert_allowed_without_patch(&answer);
}

#[test]
fn inject_true_annotation_still_injects() {
    let mut pod = simple_pod();
    pod["metadata"]["annotations"] = json!({ "portcullis.io/inject": "true" });

    let answer = mutate(
        &review_of(pod.clone()),
        &config(FailurePolicy::Ignore, None),
    );
    let patched = apply_response(&answer, &pod);

    assert_eq!(patched["spec"]["containers"][1]["name"], "portcullis");
}

#[test]
fn other_kinds_and_operations_pass_unchanged() {
    let config = config(FailurePolicy::Fail, None);
    let mut update = review_of(simple_pod());
    update["request"]["operation"] = json!("UPDATE");
    let mut deployment = review_of(json!({ "kind": "Deployment" }));
    deployment["request"]["kind"] =
        json!({ "group": "apps", "version": "v1", "kind": "Deployment" });
    let mut ephemeral = review_of(simple_pod());
    ephemeral["request"]["subResource"] = json!("ephemeralcontainers");

    for review in [update, deployment, ephemeral] {
        assert_allowed_without_patch(&mutate(&review, &config));
    }
}

#[test]
fn volume_name_conflict_warns_and_allows_under_ignore() {
    let mut pod = simple_pod();
    pod["spec"]["volumes"] = json!([{ "name": "portcullis-policy", "emptyDir": {} }]);

    let answer = mutate(&review_of(pod), &config(FailurePolicy::Ignore, None));

    assert_allowed_without_patch(&answer);
    assert_eq!(
        answer["response"]["warnings"],
        json!([
            "portcullis sidecar not injected: the pod already has a volume named \"portcullis-policy\""
        ])
    );
}

#[test]
fn volume_name_conflict_rejects_under_fail() {
    let mut pod = simple_pod();
    pod["spec"]["volumes"] = json!([{ "name": "portcullis-config", "emptyDir": {} }]);

    let answer = mutate(&review_of(pod), &config(FailurePolicy::Fail, None));

    assert_eq!(
        answer["response"],
        json!({
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "allowed": false,
            "status": {
                "code": 500,
                "message": "portcullis sidecar injection failed: the pod already has a volume named \"portcullis-config\"",
            },
        })
    );
}

#[test]
fn port_conflict_names_container_and_port() {
    let mut pod = simple_pod();
    pod["spec"]["containers"][0]["ports"] =
        json!([{ "containerPort": 8080 }, { "containerPort": 9192 }]);

    let answer = mutate(&review_of(pod), &config(FailurePolicy::Ignore, None));

    assert_eq!(
        answer["response"]["warnings"],
        json!([
            "portcullis sidecar not injected: container \"app\" already declares port 9192, which the sidecar uses"
        ])
    );
}

#[test]
fn malformed_pod_fields_are_reported_by_path() {
    let cases = [
        (
            json!("not a pod"),
            "request.object is a string; expected an object",
        ),
        (json!({ "metadata": {} }), "request.object.spec is missing"),
        (
            json!({ "metadata": {}, "spec": { "containers": {} } }),
            "request.object.spec.containers is an object; expected an array",
        ),
        (
            json!({ "metadata": {}, "spec": { "initContainers": [7] } }),
            "request.object.spec.initContainers[0] is a number; expected an object",
        ),
        (
            json!({ "metadata": { "annotations": [] }, "spec": {} }),
            "request.object.metadata.annotations is an array; expected an object",
        ),
        (
            json!({ "metadata": { "labels": { "portcullis.io/inject": false } }, "spec": {} }),
            "request.object.metadata.labels[\"portcullis.io/inject\"] is a boolean; expected a string",
        ),
    ];
    let config = config(FailurePolicy::Ignore, None);

    for (object, message) in cases {
        let answer = mutate(&review_of(object), &config);
        assert_allowed_without_patch(&answer);
        assert_eq!(
            answer["response"]["warnings"],
            json!([format!("portcullis sidecar not injected: {message}")]),
            "{message}"
        );
    }
}

#[test]
fn malformed_review_is_answered_per_failure_policy() {
    let cases = [
        (
            json!({}),
            "unsupported AdmissionReview apiVersion \"\"; expected admission.k8s.io/v1",
        ),
        (
            json!({ "apiVersion": "admission.k8s.io/v1beta1", "request": {} }),
            "unsupported AdmissionReview apiVersion \"admission.k8s.io/v1beta1\"; expected admission.k8s.io/v1",
        ),
        (
            json!({ "apiVersion": "admission.k8s.io/v1" }),
            "the AdmissionReview has no request",
        ),
        (
            json!({ "apiVersion": "admission.k8s.io/v1", "request": {} }),
            "request.uid is missing",
        ),
    ];

    for (review, message) in cases {
        let answer = mutate(&review, &config(FailurePolicy::Fail, None));
        assert_eq!(answer["response"]["allowed"], false, "{message}");
        assert_eq!(answer["response"]["uid"], "", "{message}");
        assert_eq!(
            answer["response"]["status"]["message"],
            format!("portcullis sidecar injection failed: {message}")
        );
    }
}

#[test]
fn missing_object_on_create_is_an_error() {
    let mut review = review_of(Value::Null);
    review["request"]
        .as_object_mut()
        .expect("request")
        .remove("object");

    let answer = mutate(&review, &config(FailurePolicy::Ignore, None));

    assert_eq!(
        answer["response"]["warnings"],
        json!(["portcullis sidecar not injected: request.object is missing"])
    );
}

#[test]
fn native_mode_follows_kubernetes_version() {
    let pod = simple_pod();

    for (version, native) in [
        (None, false),
        (Some("1.28"), false),
        (Some("v1.29.0"), true),
    ] {
        let answer = mutate(
            &review_of(pod.clone()),
            &config(FailurePolicy::Ignore, version),
        );
        let patched = apply_response(&answer, &pod);
        let init_containers = patched["spec"].get("initContainers");
        assert_eq!(init_containers.is_some(), native, "{version:?}");
        assert_eq!(
            patched["spec"]["containers"].as_array().map(Vec::len),
            Some(if native { 1 } else { 2 }),
            "{version:?}"
        );
    }
}

#[test]
fn optional_volumes_follow_template() {
    let mut config = config(FailurePolicy::Ignore, None);
    config.sidecar = SidecarTemplate {
        policy_config_map: None,
        ..config.sidecar
    };

    let answer = mutate(&review_of(simple_pod()), &config);
    let patched = apply_response(&answer, &simple_pod());

    assert_eq!(
        patched["spec"]["volumes"],
        json!([{ "name": "portcullis-config", "configMap": { "name": "portcullis-sidecar" } }])
    );
    assert_eq!(
        patched["spec"]["containers"][1]["volumeMounts"],
        json!([{ "name": "portcullis-config", "mountPath": "/etc/portcullis", "readOnly": true }])
    );
}
