"""Validate Kubernetes objects from YAML or JSON files against the Kubernetes JSON schemas.

Built-in kinds are checked with the strict schemas bundled by the PyPI package
kubernetes-validate (unknown fields are errors). That package has no schema for cert-manager
and Istio kinds, so they are checked against the small schemas below. Those cover the fields
this chart writes and the values those fields accept, not the whole custom resource.

Usage: python validate.py --kubernetes-version 1.29 FILE...

Prints one line per object, `ok KIND/NAME` or `invalid KIND/NAME: REASON`, and exits 1 when
any object is invalid or has an unknown kind.
"""

import argparse
import sys

import jsonschema
import kubernetes_validate
import yaml

STRING_LIST = {"type": "array", "items": {"type": "string"}}

METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"},
        "namespace": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def custom_resource(api_version, kind, spec):
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": METADATA,
            "spec": spec,
        },
    }


CUSTOM_SCHEMAS = {
    ("cert-manager.io/v1", "Issuer"): custom_resource(
        "cert-manager.io/v1",
        "Issuer",
        {
            "type": "object",
            "minProperties": 1,
            "maxProperties": 1,
            "properties": {"selfSigned": {"type": "object"}, "ca": {"type": "object"}},
            "additionalProperties": False,
        },
    ),
    ("cert-manager.io/v1", "Certificate"): custom_resource(
        "cert-manager.io/v1",
        "Certificate",
        {
            "type": "object",
            "required": ["secretName", "issuerRef", "dnsNames"],
            "additionalProperties": False,
            "properties": {
                "secretName": {"type": "string", "minLength": 1},
                "duration": {"type": "string", "pattern": "^([0-9]+(\\.[0-9]+)?(ns|us|ms|s|m|h))+$"},
                "renewBefore": {"type": "string", "pattern": "^([0-9]+(\\.[0-9]+)?(ns|us|ms|s|m|h))+$"},
                "commonName": {"type": "string", "maxLength": 64},
                "dnsNames": {**STRING_LIST, "minItems": 1},
                "privateKey": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                        "size": {"type": "integer"},
                        "rotationPolicy": {"enum": ["Never", "Always"]},
                        "encoding": {"enum": ["PKCS1", "PKCS8"]},
                    },
                },
                "usages": {
                    "type": "array",
                    "items": {"enum": ["server auth", "client auth", "digital signature", "key encipherment"]},
                },
                "issuerRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "kind": {"type": "string", "minLength": 1},
                        "group": {"type": "string", "minLength": 1},
                    },
                },
            },
        },
    ),
    ("networking.istio.io/v1", "ServiceEntry"): custom_resource(
        "networking.istio.io/v1",
        "ServiceEntry",
        {
            "type": "object",
            "required": ["hosts"],
            "additionalProperties": False,
            "properties": {
                "hosts": {**STRING_LIST, "minItems": 1},
                "exportTo": STRING_LIST,
                "location": {"enum": ["MESH_EXTERNAL", "MESH_INTERNAL"]},
                "resolution": {"enum": ["NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN"]},
                "ports": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["number", "name", "protocol"],
                        "additionalProperties": False,
                        "properties": {
                            "number": {"type": "integer", "minimum": 1, "maximum": 65535},
                            "name": {"type": "string", "minLength": 1},
                            "protocol": {"enum": ["HTTP", "HTTPS", "GRPC", "HTTP2", "MONGO", "TCP", "TLS"]},
                            "targetPort": {"type": "integer"},
                        },
                    },
                },
                "endpoints": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["address"],
                        "properties": {"address": {"type": "string", "minLength": 1}},
                    },
                },
            },
        },
    ),
    ("security.istio.io/v1", "AuthorizationPolicy"): custom_resource(
        "security.istio.io/v1",
        "AuthorizationPolicy",
        {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "required": ["matchLabels"],
                    "properties": {
                        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
                    },
                },
                "action": {"enum": ["ALLOW", "DENY", "AUDIT", "CUSTOM"]},
                "provider": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {"name": {"type": "string", "minLength": 1}},
                },
                "rules": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "from": {"type": "array"},
                            "when": {"type": "array"},
                            "to": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["operation"],
                                    "properties": {
                                        "operation": {
                                            "type": "object",
                                            "additionalProperties": False,
                                            "minProperties": 1,
                                            "properties": {
                                                key: STRING_LIST
                                                for key in (
                                                    "hosts", "notHosts", "ports", "notPorts",
                                                    "methods", "notMethods", "paths", "notPaths",
                                                )
                                            },
                                        }
                                    },
                                },
                            },
                        },
                    },
                },
            },
            # A CUSTOM policy must name its provider; other actions must not have one.
            "if": {"properties": {"action": {"const": "CUSTOM"}}, "required": ["action"]},
            "then": {"required": ["provider", "rules"]},
            "else": {"not": {"required": ["provider"]}},
        },
    ),
}


def describe(document):
    kind = document.get("kind", "(no kind)")
    name = (document.get("metadata") or {}).get("name", "(no name)")
    namespace = (document.get("metadata") or {}).get("namespace")
    return f"{kind}/{namespace}/{name}" if namespace else f"{kind}/{name}"


def validate(document, kubernetes_version):
    """Returns None when the object is valid, or the reason."""
    key = (document.get("apiVersion"), document.get("kind"))
    custom = CUSTOM_SCHEMAS.get(key)
    try:
        if custom is not None:
            jsonschema.validate(document, custom)
        else:
            kubernetes_validate.validate(document, kubernetes_version, strict=True)
    except jsonschema.ValidationError as error:
        path = "/".join(str(part) for part in error.absolute_path)
        return f"at '/{path}': {error.message}"
    except kubernetes_validate.SchemaNotFoundError as error:
        return error.message
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubernetes-version", required=True, help="such as 1.29")
    parser.add_argument("files", nargs="+")
    arguments = parser.parse_args()

    invalid = 0
    for path in arguments.files:
        with open(path, encoding="utf-8") as file:
            documents = [document for document in yaml.safe_load_all(file) if document]
        if not documents:
            print(f"invalid {path}: no Kubernetes objects")
            invalid += 1
        for document in documents:
            reason = validate(document, arguments.kubernetes_version)
            if reason is None:
                print(f"ok {describe(document)}")
            else:
                print(f"invalid {describe(document)}: {reason}")
                invalid += 1
    return 1 if invalid else 0


if __name__ == "__main__":
    sys.exit(main())
