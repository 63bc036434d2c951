//! The floor of the benchmarks: an ext_authz v3 gRPC server on the same stack as portcullis
//! (tonic and envoy-types) that allows every request without looking at it.
//!
//!     portcullis-floor 127.0.0.1:9291

use std::net::SocketAddr;
use std::process::ExitCode;

use envoy_types::pb::envoy::service::auth::v3::authorization_server::{
    Authorization, AuthorizationServer,
};
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse};
use envoy_types::pb::google::rpc::Status;
use tonic::transport::Server;

/// Allows every Check with status `OK`, which Envoy treats as an allow.
const USAGE: &str = "usage: portcullis-floor IP:PORT

Serves ext_authz v3 gRPC on IP:PORT (such as 127.0.0.1:9291) and allows every request
without looking at it: the floor that scripts/bench compares portcullis with.";

struct AllowAll;

#[tonic::async_trait]
impl Authorization for AllowAll {
    async fn check(
        &self,
        _request: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        let response = CheckResponse {
            status: Some(Status {
                code: 0,
                ..Status::default()
            }),
            ..CheckResponse::default()
        };
        Ok(tonic::Response::new(response))
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let Some(argument) = std::env::args().nth(1) else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    if argument == "--help" || argument == "-h" {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let address: SocketAddr = match argument.parse() {
        Ok(address) => address,
        Err(error) => {
            eprintln!(
                "portcullis-floor: invalid address {argument:?}: {error}; expected IP:PORT such as 127.0.0.1:9291"
            );
            return ExitCode::from(2);
        }
    };

    let served = Server::builder()
        .add_service(AuthorizationServer::new(AllowAll))
        .serve(address)
        .await;
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("portcullis-floor: cannot serve on {address}: {error}");
            ExitCode::FAILURE
        }
    }
}
