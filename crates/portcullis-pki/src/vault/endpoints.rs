//! Vault PKI endpoints that vaultrs types too strictly for real responses. Its issue response
//! takes `expiration` as a number only, but one of Vault's documentation samples quotes it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustify::endpoint::Endpoint;
use rustify::enums::{RequestMethod, RequestType, ResponseType};
use rustify::errors::ClientError as RestClientError;
use serde::{Deserialize, Deserializer, Serialize};

/// `POST {mount}/issue/{role}`: generates a key pair and a certificate signed by the mount's
/// default issuer.
#[derive(Debug, Serialize)]
pub struct IssueRequest {
    #[serde(skip)]
    pub mount: String,
    #[serde(skip)]
    pub role: String,
    pub common_name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub alt_names: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub uri_sans: String,
    pub ttl: String,
    pub format: &'static str,
    pub private_key_format: &'static str,
}

/// The `data` of an issue response. The private key is kept out of `Debug`.
#[derive(Deserialize)]
pub struct IssueResponse {
    pub certificate: String,
    #[serde(default)]
    pub issuing_ca: String,
    #[serde(default)]
    pub ca_chain: Option<Vec<String>>,
    pub private_key: String,
    #[serde(default)]
    pub serial_number: String,
    #[serde(default, deserialize_with = "expiration")]
    pub expiration: Option<SystemTime>,
}

impl Endpoint for IssueRequest {
    type Response = IssueResponse;
    const REQUEST_BODY_TYPE: RequestType = RequestType::JSON;
    const RESPONSE_BODY_TYPE: ResponseType = ResponseType::JSON;

    fn path(&self) -> String {
        format!("{}/issue/{}", self.mount, self.role)
    }

    fn method(&self) -> RequestMethod {
        RequestMethod::POST
    }

    fn body(&self) -> Result<Option<Vec<u8>>, RestClientError> {
        serde_json::to_vec(self)
            .map(Some)
            .map_err(|error| RestClientError::DataParseError { source: error.into() })
    }
}

/// `GET {mount}/cert/ca_chain`: the mount's CA chain as one PEM text. Vault returns this path
/// in JSON, unlike `{mount}/ca_chain`, which returns bare PEM.
#[derive(Debug)]
pub struct CaChainRequest {
    pub mount: String,
}

#[derive(Debug, Deserialize)]
pub struct CaChainResponse {
    pub certificate: String,
}

impl Endpoint for CaChainRequest {
    type Response = CaChainResponse;
    const REQUEST_BODY_TYPE: RequestType = RequestType::JSON;
    const RESPONSE_BODY_TYPE: ResponseType = ResponseType::JSON;

    fn path(&self) -> String {
        format!("{}/cert/ca_chain", self.mount)
    }

    fn method(&self) -> RequestMethod {
        RequestMethod::GET
    }
}

/// Reads Vault's `expiration`, unix seconds written as a number in real answers and as a
/// quoted string in one documentation sample. Null reads as absent.
pub fn expiration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<SystemTime>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Seconds {
        Number(u64),
        Text(String),
    }

    let seconds = match Option::<Seconds>::deserialize(deserializer)? {
        None => return Ok(None),
        Some(Seconds::Number(seconds)) => seconds,
        Some(Seconds::Text(text)) => text.trim().parse::<u64>().map_err(|_| {
            serde::de::Error::custom(format!("invalid expiration {text:?}; expected unix seconds"))
        })?,
    };
    Ok(Some(UNIX_EPOCH + Duration::from_secs(seconds)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<IssueResponse, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn expiration_as_a_number_is_read() {
        let response = parse(r#"{"certificate":"c","private_key":"k","expiration":1654105687}"#).unwrap();

        assert_eq!(response.expiration, Some(UNIX_EPOCH + Duration::from_secs(1_654_105_687)));
    }

    #[test]
    fn expiration_as_a_string_is_read() {
        let response = parse(r#"{"certificate":"c","private_key":"k","expiration":"1654105687"}"#).unwrap();

        assert_eq!(response.expiration, Some(UNIX_EPOCH + Duration::from_secs(1_654_105_687)));
    }

    #[test]
    fn missing_or_null_expiration_is_absent() {
        assert_eq!(parse(r#"{"certificate":"c","private_key":"k"}"#).unwrap().expiration, None);
        assert_eq!(parse(r#"{"certificate":"c","private_key":"k","expiration":null}"#).unwrap().expiration, None);
    }

    #[test]
    fn non_numeric_expiration_is_an_error() {
        let error = parse(r#"{"certificate":"c","private_key":"k","expiration":"tomorrow"}"#).err().unwrap();

        assert!(error.to_string().starts_with("invalid expiration \"tomorrow\"; expected unix seconds"), "{error}");
    }

    #[test]
    fn issue_request_body_has_vault_field_names() {
        let request = IssueRequest {
            mount: "pki".to_owned(),
            role: "portcullis".to_owned(),
            common_name: "authz.example".to_owned(),
            alt_names: "authz.example,localhost".to_owned(),
            uri_sans: "spiffe://cluster.local/ns/shop/sa/cart".to_owned(),
            ttl: "24h".to_owned(),
            format: "pem",
            private_key_format: "pkcs8",
        };

        let body: serde_json::Value = serde_json::from_slice(&request.body().unwrap().unwrap()).unwrap();

        assert_eq!(request.path(), "pki/issue/portcullis");
        assert_eq!(
            body,
            serde_json::json!({
                "common_name": "authz.example",
                "alt_names": "authz.example,localhost",
                "uri_sans": "spiffe://cluster.local/ns/shop/sa/cart",
                "ttl": "24h",
                "format": "pem",
                "private_key_format": "pkcs8"
            })
        );
    }
}
