# Unit tests for policy.rego: run with `opa test policies/example` or `cargo test -p
# portcullis-policy` (which runs them with regorus).
package envoy.authz_test

import data.envoy.authz

# An input document in the OPA Envoy plugin's shape.
request(method, path, parsed_path, headers, body) := {
	"attributes": {"request": {"http": {
		"method": method,
		"path": path,
		"host": "app.example",
		"headers": object.union({":method": method, ":path": path}, headers),
	}}},
	"parsed_path": parsed_path,
	"parsed_query": {},
	"parsed_body": body,
	"truncated_body": false,
	"version": {"encoding": "protojson", "ext_authz": "v3"},
}

order(body) := request("POST", "/api/orders", ["api", "orders"], {"content-type": "application/json"}, body)

allowed_decision(reason) := {
	"allowed": true,
	"headers": {"x-portcullis-policy": "example"},
	"request_headers_to_remove": ["x-internal-debug"],
	"response_headers_to_add": {"x-portcullis-decision": "allowed"},
	"dynamic_metadata": {"policy": "example", "reason": reason},
}

denied_decision(status, reason) := {
	"allowed": false,
	"http_status": status,
	"headers": {"content-type": "application/json", "x-portcullis-policy": "example"},
	"body": json.marshal({"reason": reason}),
	"dynamic_metadata": {"policy": "example", "reason": reason},
}

test_public_get_is_allowed if {
	decision := authz.allow with input as request("GET", "/public/docs", ["public", "docs"], {}, null)
	decision == allowed_decision("public resource")
}

test_public_head_is_allowed if {
	decision := authz.allow with input as request("HEAD", "/public/docs", ["public", "docs"], {}, null)
	decision == allowed_decision("public resource")
}

test_public_post_is_denied_with_403 if {
	decision := authz.allow with input as request("POST", "/public/docs", ["public", "docs"], {}, {})
	decision == denied_decision(403, "no rule allows this request")
}

test_dot_dot_segment_is_denied_with_400 if {
	decision := authz.allow with input as request("GET", "/public/../admin", ["public", "..", "admin"], {}, null)
	decision == denied_decision(400, "path must not contain . or .. segments")
}

test_encoded_dot_segment_is_denied_with_400 if {
	decision := authz.allow with input as request("GET", "/public/%2E/docs", ["public", "%2E", "docs"], {}, null)
	decision == denied_decision(400, "path must not contain . or .. segments")
}

test_admin_with_admin_role_is_allowed if {
	decision := authz.allow with input as request("DELETE", "/admin/users/7", ["admin", "users", "7"], {"x-role": "admin"}, null)
	decision == allowed_decision("admin role")
}

test_admin_without_role_is_denied_with_403 if {
	decision := authz.allow with input as request("GET", "/admin/users", ["admin", "users"], {}, null)
	decision == denied_decision(403, "admin role required")
}

test_admin_with_other_role_is_denied_with_403 if {
	decision := authz.allow with input as request("GET", "/admin/users", ["admin", "users"], {"x-role": "user"}, null)
	decision == denied_decision(403, "admin role required")
}

test_admin_role_joined_with_another_is_denied if {
	# Envoy joins a repeated header with commas; only the exact value grants the role.
	decision := authz.allow with input as request("GET", "/admin/users", ["admin", "users"], {"x-role": "admin,user"}, null)
	decision.allowed == false
}

test_order_with_quantity_in_range_is_allowed if {
	every quantity in [1, 5, 100] {
		decision := authz.allow with input as order({"quantity": quantity})
		decision == allowed_decision("order accepted")
	}
}

test_order_with_quantity_out_of_range_is_denied_with_400 if {
	every quantity in [0, -3, 101] {
		decision := authz.allow with input as order({"quantity": quantity})
		decision == denied_decision(400, "quantity must be a whole number from 1 to 100")
	}
}

test_order_with_fractional_quantity_is_denied_with_400 if {
	decision := authz.allow with input as order({"quantity": 2.5})
	decision.http_status == 400
}

test_order_with_string_quantity_is_denied_with_400 if {
	decision := authz.allow with input as order({"quantity": "5"})
	decision.http_status == 400
}

test_order_without_body_is_denied_with_400 if {
	decision := authz.allow with input as order(null)
	decision.http_status == 400
}

test_order_listing_is_denied_with_403 if {
	decision := authz.allow with input as request("GET", "/api/orders", ["api", "orders"], {}, null)
	decision == denied_decision(403, "no rule allows this request")
}

test_unknown_path_is_denied_with_403 if {
	decision := authz.allow with input as request("GET", "/internal/metrics", ["internal", "metrics"], {}, null)
	decision == denied_decision(403, "no rule allows this request")
}

test_empty_input_is_denied_with_403 if {
	decision := authz.allow with input as {}
	decision == denied_decision(403, "no rule allows this request")
}

test_deny_body_is_json_with_reason if {
	decision := authz.allow with input as request("GET", "/admin", ["admin"], {}, null)
	json.unmarshal(decision.body) == {"reason": "admin role required"}
}
