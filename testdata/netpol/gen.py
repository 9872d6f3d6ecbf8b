#!/usr/bin/env python3
"""Generates testdata/netpol/cases/*.yaml: the upstream Kubernetes e2e network policy tests
(test/e2e/network/netpol/network_policy.go) translated to palisade conformance cases.

Each case: the policies (as applied), the probes (port, protocol) and the expected reachability
matrix, built the way upstream builds it (NewReachability(all, true) + ExpectPeer/ExpectAllIngress/
ExpectAllEgress/Expect) over the full x/y/z x a/b/c model. Upstream ignores loopback; palisade's
semantics say a pod always reaches itself, so the diagonal is always allowed here.

Multi-step upstream tests (policy updated, label added) become one case per step. Run:
    python3 testdata/netpol/gen.py   # rewrites testdata/netpol/cases/
"""
import os, shutil, json

NS = ["x", "y", "z"]
PODS = ["a", "b", "c"]
ALL = [f"{n}/{p}" for n in NS for p in PODS]
HERE = os.path.dirname(os.path.abspath(__file__))
IP4 = {f"{n}/{p}": f"198.18.{i+1}.{j+10}" for i, n in enumerate(NS) for j, p in enumerate(PODS)}
IP6 = {f"{n}/{p}": f"fd00:18:{i+1}::{j+10:x}" for i, n in enumerate(NS) for j, p in enumerate(PODS) if n != "z"}


class R:
    def __init__(self, default=True):
        self.m = {(f, t): default for f in ALL for t in ALL}

    def peer(self, frm, to, v):
        for f in ALL:
            for t in ALL:
                if match(f, frm) and match(t, to):
                    self.m[(f, t)] = v
        return self

    def all_ingress(self, pod, v):
        return self.peer({}, {"pod": pod}, v)

    def all_egress(self, pod, v):
        return self.peer({"pod": pod}, {}, v)

    def expect(self, f, t, v):
        self.m[(f, t)] = v
        return self

    def rows(self):
        out = {}
        for f in ALL:
            out[f] = " ".join("." if (self.m[(f, t)] or f == t) else "X" for t in ALL)
        return out


def match(pod, sel):
    ns, name = pod.split("/")
    if "pod" in sel and "/" in sel["pod"]:
        return pod == sel["pod"]
    if "ns" in sel and sel["ns"] != ns:
        return False
    if "name" in sel and sel["name"] != name:
        return False
    return True


def X(name=None):
    return {"ns": "x"} if name is None else {"ns": "x", "name": name}


def Y(name=None):
    return {"ns": "y"} if name is None else {"ns": "y", "name": name}


def Z(name=None):
    return {"ns": "z"} if name is None else {"ns": "z", "name": name}


def pol(name, ns="x", pod_selector=None, ingress=None, egress=None, types=None):
    spec = {"podSelector": pod_selector if pod_selector is not None else {}}
    if ingress is not None:
        spec["ingress"] = ingress
    if egress is not None:
        spec["egress"] = egress
    if types is not None:
        spec["policyTypes"] = types
    elif ingress is not None and egress is None:
        spec["policyTypes"] = ["Ingress"]
    elif egress is not None and ingress is None:
        spec["policyTypes"] = ["Egress"]
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def ml(**kw):
    return {"matchLabels": {k.replace("__", "/").replace("_", "."): v for k, v in kw.items()}}


NSNAME = "kubernetes.io/metadata.name"
POD_A = {"matchLabels": {"pod": "a"}}
POD_B = {"matchLabels": {"pod": "b"}}
NS_Y = {"matchLabels": {NSNAME: "y"}}
NS_X = {"matchLabels": {NSNAME: "x"}}
NOT_X = {"matchExpressions": [{"key": NSNAME, "operator": "NotIn", "values": ["x"]}]}

CASES = []


def case(slug, title, policies, checks, inventory_patch=None, note=None):
    CASES.append((slug, title, policies, checks, inventory_patch, note))


def chk(port, proto, r):
    return {"port": port, "protocol": proto, "expect": r.rows()}


def all_true():
    return R()

# --- NetworkPolicy between server and client (TCP) ---------------------------------------------
deny_ingress = pol("deny-ingress", ingress=[])
case("default-deny-ingress", "should support a 'default-deny-ingress' policy",
     [deny_ingress], [chk(80, "TCP", R().peer({}, X(), False))])
case("default-deny-all", "should support a 'default-deny-all' policy",
     [pol("deny-all", ingress=[], egress=[], types=["Ingress", "Egress"])],
     [chk(80, "TCP", R().peer({}, X(), False).peer(X(), {}, False))])
case("podselector-within-namespace", "should enforce policy to allow traffic from pods within server namespace based on PodSelector",
     [pol("x-a-allows-x-b", pod_selector=POD_A, ingress=[{"from": [{"podSelector": POD_B}]}])],
     [chk(80, "TCP", R().all_ingress("x/a", False).expect("x/b", "x/a", True))])
case("allow-ingress-for-target", "should enforce policy to allow ingress traffic for a target",
     [pol("deny-all", ingress=[]),
      pol("allow-all-to-a", pod_selector=POD_A, ingress=[{"from": [{"podSelector": {}, "namespaceSelector": {}}]}])],
     [chk(80, "TCP", R().peer({}, X(), False).all_ingress("x/a", True))])
case("allow-from-all-namespaces", "should enforce policy to allow ingress traffic from pods in all namespaces",
     [pol("allow-from-another-ns", pod_selector=POD_A, ingress=[{"from": [{"namespaceSelector": {"matchLabels": {}}}]}])],
     [chk(80, "TCP", R())])
case("namespaceselector-other-namespace", "should enforce policy to allow traffic only from a different namespace, based on NamespaceSelector",
     [pol("allow-client-a-via-ns-selector", pod_selector=POD_A, ingress=[{"from": [{"namespaceSelector": NS_Y}]}])],
     [chk(80, "TCP", R().peer(X(), X("a"), False).peer(Z(), X("a"), False))])
case("podselector-matchexpressions", "should enforce policy based on PodSelector with MatchExpressions",
     [pol("x-a-allows-x-b", pod_selector=POD_A, ingress=[{"from": [{"podSelector": {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["b"]}]}}]}])],
     [chk(80, "TCP", R().all_ingress("x/a", False).expect("x/b", "x/a", True))])
case("namespaceselector-matchexpressions", "should enforce policy based on NamespaceSelector with MatchExpressions",
     [pol("allow-ns-y-match-selector", pod_selector=POD_A, ingress=[{"from": [{"namespaceSelector": {"matchExpressions": [{"key": NSNAME, "operator": "In", "values": ["y"]}]}}]}])],
     [chk(80, "TCP", R().peer(X(), X("a"), False).peer(Z(), X("a"), False))])
case("podselector-or-namespaceselector", "should enforce policy based on PodSelector or NamespaceSelector",
     [pol("allow-ns-y-match-selector", pod_selector=POD_A, ingress=[{"from": [{"namespaceSelector": NOT_X}, {"podSelector": POD_B}]}])],
     [chk(80, "TCP", R().expect("x/a", "x/a", False).expect("x/c", "x/a", False))])
case("podselector-and-namespaceselector", "should enforce policy based on PodSelector and NamespaceSelector",
     [pol("allow-ns-y-podselector-and-nsselector", pod_selector=POD_A, ingress=[{"from": [{"namespaceSelector": NOT_X, "podSelector": POD_B}]}])],
     [chk(80, "TCP", R().all_ingress("x/a", False).expect("y/b", "x/a", True).expect("z/b", "x/a", True))])
case("multiple-podselectors-and-namespaceselectors", "should enforce policy based on Multiple PodSelectors and NamespaceSelectors",
     [pol("allow-ns-y-z-pod-b-c", pod_selector=POD_A, ingress=[{"from": [{"namespaceSelector": NOT_X, "podSelector": {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["b", "c"]}]}}]}])],
     [chk(80, "TCP", R().peer(X(), X("a"), False).expect("y/a", "x/a", False).expect("z/a", "x/a", False))])
case("any-podselectors", "should enforce policy based on any PodSelectors",
     [pol("allow-ns-x-pod-b-c", pod_selector=POD_A, ingress=[{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}, {"podSelector": {"matchLabels": {"pod": "c"}}}]}])],
     [chk(80, "TCP", R().all_ingress("x/a", False).expect("x/b", "x/a", True).expect("x/c", "x/a", True))])
case("pod-in-other-namespace-pod-and-ns-selector", "should enforce policy to allow traffic only from a pod in a different namespace based on PodSelector and NamespaceSelector",
     [pol("allow-ns-y-pod-a-via-namespace-pod-selector", pod_selector=POD_A, ingress=[{"from": [{"namespaceSelector": NS_Y, "podSelector": POD_A}]}])],
     [chk(80, "TCP", R().all_ingress("x/a", False).expect("y/a", "x/a", True))])
port81_from_y = pol("allow-client-a-via-ns-selector", pod_selector=POD_A, ingress=[{"from": [{"namespaceSelector": NS_Y}], "ports": [{"port": 81, "protocol": "TCP"}]}])
allow81 = R().peer(X(), X("a"), False).peer(Y(), X("a"), True).peer(Z(), X("a"), False)
case("ports", "should enforce policy based on Ports",
     [port81_from_y], [chk(81, "TCP", allow81), chk(80, "TCP", R().all_ingress("x/a", False))])
case("stacked-policies-step2", "should enforce multiple, stacked policies with overlapping podSelectors (after adding the port-80 policy)",
     [port81_from_y, pol("allow-client-a-via-ns-selector-80", pod_selector=POD_A, ingress=[{"from": [{"namespaceSelector": NS_Y}], "ports": [{"port": 80, "protocol": "TCP"}]}])],
     [chk(80, "TCP", allow81), chk(81, "TCP", allow81)])
allow_all = pol("allow-all", ingress=[{}])
case("allow-all", "should support allow-all policy", [allow_all], [chk(80, "TCP", R()), chk(81, "TCP", R())])
case("named-port-ingress", "should allow ingress access on one named port",
     [pol("allow-all", ingress=[{"ports": [{"port": "serve-81-tcp"}]}])],
     [chk(81, "TCP", R()), chk(80, "TCP", R().peer({}, X(), False))])
case("named-port-ingress-from-namespace", "should allow ingress access from namespace on one named port",
     [pol("allow-client-a-via-ns-selector-80", pod_selector=POD_A, ingress=[{"from": [{"namespaceSelector": NS_Y}], "ports": [{"port": "serve-80-tcp", "protocol": "TCP"}]}])],
     [chk(80, "TCP", R().peer(X(), X("a"), False).peer(Z(), X("a"), False)), chk(81, "TCP", R().all_ingress("x/a", False))])
case("named-port-egress", "should allow egress access on one named port",
     [pol("allow-egress", egress=[{"ports": [{"port": "serve-80-tcp"}]}])],
     [chk(80, "TCP", R()), chk(81, "TCP", R().peer(X(), {}, False))])
case("updated-policy-step1", "should enforce updated policy (allow all)", [pol("allow-all-mutate-to-deny-all", ingress=[{}])], [chk(81, "TCP", R())])
case("updated-policy-step2", "should enforce updated policy (mutated to deny all)", [pol("allow-all-mutate-to-deny-all", ingress=[])],
     [chk(81, "TCP", R().peer({}, X(), False))])
ns2 = pol("allow-client-a-via-ns-selector", pod_selector=POD_A, ingress=[{"from": [{"namespaceSelector": {"matchLabels": {"ns2": "updated"}}}]}])
case("updated-namespace-step1", "should allow ingress access from updated namespace (before the label)", [ns2], [chk(80, "TCP", R().all_ingress("x/a", False))])
case("updated-namespace-step2", "should allow ingress access from updated namespace (namespace y labelled ns2=updated)", [ns2],
     [chk(80, "TCP", R().all_ingress("x/a", False).peer(Y(), {}, True))], inventory_patch={"namespaces": {"y": {"ns2": "updated"}}})
podupd = pol("allow-client-a-via-pod-selector", pod_selector=POD_A, ingress=[{"from": [{"podSelector": {"matchLabels": {"pod": "b", "pod2": "updated"}}}]}])
case("updated-pod-step1", "should allow ingress access from updated pod (before the label)", [podupd], [chk(80, "TCP", R().all_ingress("x/a", False))])
case("updated-pod-step2", "should allow ingress access from updated pod (x/b labelled pod2=updated)", [podupd],
     [chk(80, "TCP", R().all_ingress("x/a", False).expect("x/b", "x/a", True))], inventory_patch={"pods": {"x/b": {"pod2": "updated"}}})
case("deny-ingress-other-namespaces", "should deny ingress from pods on other namespaces",
     [pol("deny-empty-policy", ingress=[{"from": [{"podSelector": {"matchLabels": {}}}]}])],
     [chk(80, "TCP", R().peer(Y(), X(), False).peer(Z(), X(), False))])
isolated = pol("deny-ingress-via-label-selector", pod_selector={"matchLabels": {"target": "isolated"}}, ingress=[])
case("deny-ingress-updated-pod-step1", "should deny ingress access to updated pod (before the label)", [isolated], [chk(80, "TCP", R())])
case("deny-ingress-updated-pod-step2", "should deny ingress access to updated pod (x/a labelled target=isolated)", [isolated],
     [chk(80, "TCP", R().all_ingress("x/a", False))], inventory_patch={"pods": {"x/a": {"target": "isolated"}}})
case("deny-egress-podselector", "should deny egress from pods based on PodSelector",
     [pol("deny-egress-pod-a", pod_selector=POD_A, egress=[])], [chk(80, "TCP", R().all_egress("x/a", False))])
case("deny-egress-namespace", "should deny egress from all pods in a namespace",
     [pol("deny-egress-ns-x", egress=[])], [chk(80, "TCP", R().peer(X(), {}, False))])
ie = pol("allow-client-a-via-pod-selector", pod_selector=POD_A, ingress=[{"from": [{"podSelector": POD_B}]}], egress=[{"ports": [{"port": 80}]}], types=["Egress", "Ingress"])
case("ingress-and-egress-together", "should work with Ingress, Egress specified together", [ie],
     [chk(80, "TCP", R().all_ingress("x/a", False).expect("x/b", "x/a", True)),
      chk(81, "TCP", R().all_ingress("x/a", False).all_egress("x/a", False).expect("x/b", "x/a", True))])
ing_xa = [{"from": [{"namespaceSelector": NS_X, "podSelector": POD_A}]}]
case("deny-egress-client-side", "should support denying of egress traffic on the client side (even if the server explicitly allows this traffic)",
     [pol("allow-to-ns-y-pod-a", pod_selector=POD_A, egress=[{"to": [{"namespaceSelector": NS_Y, "podSelector": POD_A}]}]),
      pol("allow-from-xa-on-ya-match-selector", ns="y", pod_selector=POD_A, ingress=ing_xa),
      pol("allow-from-xa-on-yb-match-selector", ns="y", pod_selector=POD_B, ingress=ing_xa)],
     [chk(80, "TCP", R().peer({"pod": "x/a"}, {}, False).peer({}, {"pod": "y/a"}, False).peer({"pod": "x/a"}, {"pod": "y/a"}, True).peer({}, {"pod": "y/b"}, False))])
case("egress-to-other-namespace-pod-and-ns-selector", "should enforce egress policy allowing traffic to a server in a different namespace based on PodSelector and NamespaceSelector",
     [pol("allow-to-ns-y-pod-a", pod_selector=POD_A, egress=[{"to": [{"namespaceSelector": NS_Y, "podSelector": POD_A}]}])],
     [chk(80, "TCP", R().all_egress("x/a", False).expect("x/a", "y/a", True))])
case("ingress-any-port-specific-protocol", "should enforce ingress policy allowing any port traffic to a server on a specific protocol",
     [pol("allow-ingress-by-proto", pod_selector=POD_A, ingress=[{"ports": [{"protocol": "TCP"}]}])],
     [chk(80, "TCP", R()), chk(80, "UDP", R().peer({}, X("a"), False))])
p80 = pol("allow-ingress-port-80", ingress=[{"ports": [{"port": 80}]}])
case("ingress-allow-all-precedence-step1", "should enforce multiple ingress policies with ingress allow-all policy taking precedence (port 80 only)", [p80],
     [chk(81, "TCP", R().peer({}, X(), False))])
case("ingress-allow-all-precedence-step2", "should enforce multiple ingress policies with ingress allow-all policy taking precedence (allow-all added)",
     [p80, pol("allow-ingress", ingress=[{}])], [chk(81, "TCP", R())])
e80 = pol("allow-egress-port-80", egress=[{"ports": [{"port": 80}]}])
case("egress-allow-all-precedence-step1", "should enforce multiple egress policies with egress allow-all policy taking precedence (port 80 only)", [e80],
     [chk(81, "TCP", R().peer(X(), {}, False))])
case("egress-allow-all-precedence-step2", "should enforce multiple egress policies with egress allow-all policy taking precedence (allow-all added)",
     [e80, pol("allow-egress", egress=[{}])], [chk(81, "TCP", R())])
case("policies-deleted", "should stop enforcing policies after they are deleted (after deletion)", [], [chk(80, "TCP", R())])


def cidr_peers(pod, plen4=32, plen6=128, except_pod=None):
    # dual-stack translation: one ipBlock per family
    def net4(ip, l):
        parts = [int(p) for p in ip.split(".")]
        v = (parts[0] << 24) | (parts[1] << 16) | (parts[2] << 8) | parts[3]
        m = (0xffffffff << (32 - l)) & 0xffffffff if l else 0
        v &= m
        return f"{v >> 24}.{(v >> 16) & 255}.{(v >> 8) & 255}.{v & 255}/{l}"

    def net6(ip, l):
        import ipaddress
        return str(ipaddress.ip_network(f"{ip}/{l}", strict=False))
    out = [{"ipBlock": {"cidr": net4(IP4[pod], plen4)}}]
    if pod in IP6:
        out.append({"ipBlock": {"cidr": net6(IP6[pod], plen6)}})
    if except_pod:
        out[0]["ipBlock"]["except"] = [f"{IP4[except_pod]}/32"]
        if len(out) > 1:
            out[1]["ipBlock"]["except"] = [f"{IP6[except_pod]}/128"]
    return out


case("egress-cidr", "should allow egress access to server in CIDR block",
     [pol("allow-client-a-via-cidr-egress-rule", pod_selector=POD_A, egress=[{"to": cidr_peers("y/b")}])],
     [chk(80, "TCP", R().all_egress("x/a", False).expect("x/a", "y/b", True))])
case("egress-cidr-except", "should enforce except clause while egress access to server in CIDR block",
     [pol("allow-client-a-via-cidr-egress-rule", pod_selector=POD_A, egress=[{"to": cidr_peers("x/b", 4, 4, except_pod="x/b")}])],
     [chk(80, "TCP", R().expect("x/a", "x/b", False))])
case("egress-cidr-except-overlap-updated", "should ensure an IP overlapping both IPBlock.CIDR and IPBlock.Except is allowed (policy updated to the /32)",
     [pol("allow-client-a-via-cidr-egress-rule", pod_selector=POD_A, egress=[{"to": cidr_peers("x/b")}])],
     [chk(80, "TCP", R().all_egress("x/a", False).expect("x/a", "x/b", True))])
case("egress-cidr-except-overlap-union", "an IP in one policy's except and another policy's cidr is allowed (union of both policies; palisade extension of the upstream overlap test)",
     [pol("allow-client-a-via-cidr-egress-rule", pod_selector=POD_A, egress=[{"to": cidr_peers("x/b", 4, 4, except_pod="x/b")}]),
      pol("allow-client-a-to-x-b", pod_selector=POD_A, egress=[{"to": cidr_peers("x/b")}])],
     [chk(80, "TCP", R())])
case("ingress-egress-independent", "should enforce policies to check ingress and egress policies can be controlled independently based on PodSelector",
     [pol("allow-egress-for-target", pod_selector=POD_A, egress=[{}]), pol("deny-ingress-via-label-selector", pod_selector=POD_A, ingress=[])],
     [chk(80, "TCP", R().all_ingress("x/a", False))])
case("sctp-not-tcp", "should not mistakenly treat 'protocol: SCTP' as 'protocol: TCP', even if the plugin doesn't support SCTP",
     [deny_ingress, pol("allow-only-sctp-ingress-on-port-81", pod_selector=POD_A, ingress=[{"ports": [{"port": 81, "protocol": "SCTP"}]}])],
     [chk(81, "TCP", R().peer({}, X(), False)), chk(81, "SCTP", R().peer({}, X(), False).all_ingress("x/a", True))])
case("sctp-policy-isolates", "should properly isolate pods that are selected by a policy allowing SCTP, even if the plugin doesn't support SCTP",
     [pol("allow-only-sctp-ingress-on-port-80", pod_selector=POD_A, ingress=[{"ports": [{"port": 80, "protocol": "SCTP"}]}])],
     [chk(81, "TCP", R().all_ingress("x/a", False))])
case("udp-policy-not-tcp", "should not allow access by TCP when a policy specifies only UDP",
     [pol("allow-only-udp-ingress-on-port-81", pod_selector=POD_A, ingress=[{"ports": [{"port": 81, "protocol": "UDP"}]}])],
     [chk(81, "TCP", R().all_ingress("x/a", False)), chk(81, "UDP", R())])
case("default-ns-label-matchlabels", "should enforce policy to allow traffic based on NamespaceSelector with MatchLabels using default ns label",
     [pol("allow-client-a-via-ns-selector-for-immutable-ns-label", pod_selector=POD_A, ingress=[{"from": [{"namespaceSelector": NS_Y}]}])],
     [chk(80, "TCP", R().peer(X(), X("a"), False).peer(Z(), X("a"), False))])
case("default-ns-label-matchexpressions-egress", "should enforce policy based on NamespaceSelector with MatchExpressions using default ns label",
     [pol("allow-ns-y-match-selector-for-immutable-ns-label", pod_selector=POD_A, egress=[{"to": [{"namespaceSelector": {"matchExpressions": [{"key": NSNAME, "operator": "NotIn", "values": ["y"]}]}}]}])],
     [chk(80, "TCP", R().peer({"pod": "x/a"}, Y(), False))])
# --- UDP and SCTP ----------------------------------------------------------------------------------
for proto in ["UDP", "SCTP"]:
    lp = proto.lower()
    case(f"{lp}-default-deny-ingress", f"NetworkPolicy between server and client using {proto}: should support a 'default-deny-ingress' policy",
         [pol("deny-all", ingress=[])], [chk(80, proto, R().peer({}, X(), False))])
    case(f"{lp}-ports", f"NetworkPolicy between server and client using {proto}: should enforce policy based on Ports",
         [pol("allow-ingress-on-port-81-ns-x", pod_selector=POD_A, ingress=[{"from": [{"namespaceSelector": NS_Y}], "ports": [{"port": 81, "protocol": proto}]}])],
         [chk(81, proto, R().peer(X(), X("a"), False).peer(Z(), X("a"), False)), chk(80, proto, R().all_ingress("x/a", False))])
    case(f"{lp}-pod-in-other-namespace", f"NetworkPolicy between server and client using {proto}: should enforce policy to allow traffic only from a pod in a different namespace based on PodSelector and NamespaceSelector",
         [pol("allow-ns-y-pod-a-via-namespace-pod-selector", pod_selector=POD_A, ingress=[{"from": [{"namespaceSelector": NS_Y, "podSelector": POD_A}]}])],
         [chk(80, proto, R().all_ingress("x/a", False).expect("y/a", "x/a", True))])
# --- endPort (upstream network_policy.go of 1.21-1.25, "[Feature:NetworkPolicyEndPort]") --------
case("endport-ingress-range", "should support ingress traffic for a range of ports (endPort): 80-81 from namespace y",
     [pol("allow-ingress-port-range", pod_selector=POD_A, ingress=[{"from": [{"namespaceSelector": NS_Y}], "ports": [{"port": 80, "endPort": 81, "protocol": "TCP"}]}])],
     [chk(80, "TCP", R().peer(X(), X("a"), False).peer(Z(), X("a"), False)), chk(81, "TCP", R().peer(X(), X("a"), False).peer(Z(), X("a"), False))])
case("endport-ingress-range-excludes", "should enforce ingress endPort ranges that exclude the probed port (81-9000 excludes 80)",
     [pol("allow-ingress-port-range", pod_selector=POD_A, ingress=[{"ports": [{"port": 81, "endPort": 9000}]}])],
     [chk(80, "TCP", R().all_ingress("x/a", False)), chk(81, "TCP", R())])
case("endport-egress-range", "should support egress traffic to a range of ports (endPort) plus a single port",
     [pol("allow-egress-port-range", egress=[{"ports": [{"port": 1, "endPort": 80, "protocol": "TCP"}, {"port": 443}]}])],
     [chk(80, "TCP", R()), chk(81, "TCP", R().peer(X(), {}, False))])


def dump(path, obj):
    import yaml_lite
    yaml_lite.dump(path, obj)


def main():
    out_dir = os.path.join(HERE, "cases")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    for i, (slug, title, policies, checks, patch, note) in enumerate(CASES, 1):
        d = os.path.join(out_dir, f"{i:02d}-{slug}")
        os.makedirs(d)
        with open(os.path.join(d, "policies.yaml"), "w") as f:
            f.write(f"# upstream: {title}\n")
            for p in policies:
                f.write("---\n" + json.dumps(p) + "\n")
        with open(os.path.join(d, "case.yaml"), "w") as f:
            f.write(f"name: {json.dumps(title)}\n")
            f.write("upstream: test/e2e/network/netpol/network_policy.go\n")
            if patch:
                f.write(f"inventory_patch: {json.dumps(patch)}\n")
            f.write("# rows: from; columns: to, in order " + " ".join(ALL) + "; '.' allowed, 'X' denied\n")
            f.write("checks:\n")
            for c in checks:
                f.write(f"  - port: {c['port']}\n    protocol: {c['protocol']}\n    expect:\n")
                for frm, row in c["expect"].items():
                    f.write(f"      {frm}: \"{row}\"\n")
    with open(os.path.join(HERE, "inventory.yaml"), "w") as f:
        f.write("# The upstream netpol model: namespaces x, y, z; pods a, b, c labelled pod=<name>;\n")
        f.write("# every pod serves 80 and 81 over TCP, UDP and SCTP (named serve-<port>-<proto>).\n")
        f.write("# IPv4 in 198.18.0.0/15; pods in x and y are dual-stack.\n")
        f.write("namespaces:\n")
        for n in NS:
            f.write(f"  - name: {n}\n    labels: {{ns: {n}}}\n")
        f.write("endpoints:\n")
        for pod in ALL:
            n, p = pod.split("/")
            ips = [IP4[pod]] + ([IP6[pod]] if pod in IP6 else [])
            f.write(f"  - namespace: {n}\n    name: {p}\n    labels: {{pod: {p}}}\n    ips: [{', '.join(ips)}]\n")
            f.write("    ports:\n")
            for proto in ["TCP", "UDP", "SCTP"]:
                for port in [80, 81]:
                    f.write(f"      - {{name: serve-{port}-{proto.lower()}, port: {port}, protocol: {proto}}}\n")
            f.write(f"    cgroup: palisade-lab/netpol/{n}/{p}\n")
    print(f"{len(CASES)} cases")


if __name__ == "__main__":
    main()
