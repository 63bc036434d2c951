//! Checks the Envoy launcher and its bootstrap without portcullis.

use portcullis_e2e::{
    Envoy, EnvoyOptions, HttpRequest, Upstream, envoy_binary_or_skip, free_loopback_address, send,
};

/// With nothing listening at the ext_authz address, `failure_mode_allow: false` must make Envoy
/// deny every request with 403 and never forward it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_authz_server_denies_with_403() {
    let Some(envoy_binary) = envoy_binary_or_skip("unreachable_authz_server_denies_with_403")
    else {
        return;
    };
    let upstream = Upstream::start()
        .await
        .expect("starting the upstream failed");
    // Nothing binds this port: the address is only reserved for the duration of free_port.
    let closed_authz_address = free_loopback_address().expect("finding a free port failed");
    let options = EnvoyOptions::new(closed_authz_address, upstream.address());
    let envoy = Envoy::start(&envoy_binary, &options)
        .await
        .unwrap_or_else(|error| panic!("starting Envoy failed: {error}"));

    let get = send(envoy.listener_address(), &HttpRequest::get("/anything"))
        .await
        .unwrap_or_else(|error| panic!("GET failed: {error}\n{}", envoy.log_tail()));
    let post = send(
        envoy.listener_address(),
        &HttpRequest::post("/orders", "{\"quantity\":1}"),
    )
    .await
    .unwrap_or_else(|error| panic!("POST failed: {error}\n{}", envoy.log_tail()));

    assert_eq!(get.status, 403, "GET /anything\n{}", envoy.log_tail());
    assert_eq!(post.status, 403, "POST /orders\n{}", envoy.log_tail());
    assert_eq!(
        upstream.requests().len(),
        0,
        "the upstream must not see denied requests"
    );
}

/// Without the ext_authz filter Envoy only proxies, so the unreachable authorization server
/// does not matter and the upstream responds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_without_ext_authz_only_proxies() {
    let Some(envoy_binary) = envoy_binary_or_skip("envoy_without_ext_authz_only_proxies") else {
        return;
    };
    let upstream = Upstream::start()
        .await
        .expect("starting the upstream failed");
    let closed_authz_address = free_loopback_address().expect("finding a free port failed");
    let mut options = EnvoyOptions::new(closed_authz_address, upstream.address());
    options.ext_authz = false;
    let envoy = Envoy::start(&envoy_binary, &options)
        .await
        .unwrap_or_else(|error| panic!("starting Envoy failed: {error}"));

    let get = send(envoy.listener_address(), &HttpRequest::get("/anything"))
        .await
        .unwrap_or_else(|error| panic!("GET failed: {error}\n{}", envoy.log_tail()));

    assert_eq!(get.status, 200, "GET /anything\n{}", envoy.log_tail());
    assert_eq!(upstream.requests().len(), 1);
}
