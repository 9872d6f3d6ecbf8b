# 12. Cryptocurrency mining: known miner programs, the stratum protocol in arguments, or a
# connection to a mining pool port.
package palisade.rules.crypto_mining

import data.palisade.lib.exec_names
import data.palisade.lists

meta := {
	"id": "crypto_mining",
	"title": "Cryptocurrency mining",
	"severity": "critical",
	"mitre": ["T1496"],
	"action": "quarantine",
	"events": ["exec", "connect"],
	"prefilter": {
		"connect": [{"connect.family": {"in": ["inet", "inet6"]}, "connect.port": {"in": lists.mining_pool_ports}}],
		# A miner by name, or mining arguments in the command line.
		"exec": [
			{"exec.filename": {"basename_in": lists.miners}},
			{"exec.argv.0": {"basename_in": lists.miners}},
			{"exec.argv": {"joined_contains": lists.miner_arguments}},
		],
	},
}

alerts contains {"message": msg} if {
	input.type == "exec"
	some name in exec_names
	lower(name) in lists.miners
	msg := sprintf("miner program %s started: %s", [name, concat(" ", input.exec.argv)])
}

alerts contains {"message": msg} if {
	input.type == "exec"
	not miner_name
	command_line := lower(concat(" ", input.exec.argv))
	some fragment in lists.miner_arguments
	contains(command_line, fragment)
	msg := sprintf("mining arguments (%s): %s", [fragment, concat(" ", input.exec.argv)])
}

alerts contains {"message": msg} if {
	input.type == "connect"
	input.connect.family in {"inet", "inet6"}
	input.connect.port in lists.mining_pool_ports
	msg := sprintf("%s (pid %d) connected to %s port %d, a mining pool port", [
		input.process.comm, input.process.pid, input.connect.address, input.connect.port,
	])
}

miner_name if {
	some name in exec_names
	lower(name) in lists.miners
}
