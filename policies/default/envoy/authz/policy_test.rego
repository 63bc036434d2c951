# Unit tests for policy.rego: run with `opa test -b policies/default` or `cargo test -p
# portcullis-policy` (which runs them with regorus).
package envoy.authz_test

import data.envoy.authz

request(method, path, parsed_path) := {
	"attributes": {"request": {"http": {"method": method, "path": path, "headers": {}}}},
	"parsed_path": parsed_path,
	"parsed_query": {},
}

test_health_probes_are_allowed if {
	every path in ["healthz", "readyz", "livez"] {
		authz.allow with input as request("GET", concat("", ["/", path]), [path])
	}
	authz.allow with input as request("HEAD", "/healthz", ["healthz"])
}

test_probe_with_other_method_is_denied if {
	not authz.allow with input as request("POST", "/healthz", ["healthz"])
}

test_probe_below_health_path_is_denied if {
	not authz.allow with input as request("GET", "/healthz/extra", ["healthz", "extra"])
	not authz.allow with input as request("GET", "/healthz/", ["healthz", ""])
}

test_other_paths_are_denied if {
	not authz.allow with input as request("GET", "/", [""])
	not authz.allow with input as request("GET", "/public/docs", ["public", "docs"])
}

test_empty_input_is_denied if {
	not authz.allow with input as {}
}
