# 5. Network reconnaissance and sniffing tools: by name, or by the arguments only scanners take
# (so a renamed nmap still shows).
package palisade.rules.network_recon

import data.palisade.lib.exec_names
import data.palisade.lists

meta := {
	"id": "network_recon",
	"title": "Network reconnaissance or sniffing tool",
	"severity": "medium",
	"mitre": ["T1046", "T1040", "T1018"],
	"action": "alert",
	"events": ["exec"],
	# A recon tool by name, or a scan type among the arguments (scanner_arguments needs one).
	"prefilter": {"exec": [
		{"exec.filename": {"basename_in": lists.recon_tools}},
		{"exec.argv.0": {"basename_in": lists.recon_tools}},
		{"exec.argv": {"any_in": scan_types}},
	]},
}

alerts contains {"message": msg} if {
	some name in exec_names
	name in lists.recon_tools
	msg := sprintf("network scanning or sniffing tool run: %s", [concat(" ", input.exec.argv)])
}

alerts contains {"message": msg} if {
	not recon_name
	scanner_arguments
	msg := sprintf("port scanner arguments: %s", [concat(" ", input.exec.argv)])
}

recon_name if {
	some name in exec_names
	name in lists.recon_tools
}

# nmap-style scan types (-sS, -sT, -sU, -sV, -sn) together with a port or range option.
scan_types := {"-sS", "-sT", "-sU", "-sV", "-sn", "-sA", "-sX", "-sF", "-sN"}

scanner_arguments if {
	some arg in input.exec.argv
	arg in scan_types
	some other in input.exec.argv
	regex.match(`^(-p|--top-ports|-p-|--open|-Pn)`, other)
}
