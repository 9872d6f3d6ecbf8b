# 4. Package managers changing a running container: by name and subcommand, or by their
# behaviour -- a write to the package database, whatever the program is called.
package palisade.rules.package_manager

import data.palisade.lib.exec_names
import data.palisade.lib.open_path
import data.palisade.lists

meta := {
	"id": "package_manager",
	"title": "Package management in a running container",
	"severity": "medium",
	"mitre": ["T1072", "T1105"],
	"action": "alert",
	"events": ["exec", "open"],
	"prefilter": {
		"open": [{"open.write": true, "open.path": {"path_prefix": lists.package_databases}}],
		# A package manager by name (the keys of lists.package_managers).
		"exec": [
			{"exec.filename": {"basename_in": lists.package_managers}},
			{"exec.argv.0": {"basename_in": lists.package_managers}},
		],
	},
}

alerts contains {"message": msg} if {
	input.type == "exec"
	some name in exec_names
	subcommands := lists.package_managers[name]
	some arg in array.slice(input.exec.argv, 1, count(input.exec.argv))
	arg in subcommands
	msg := sprintf("package manager run: %s", [concat(" ", input.exec.argv)])
}

alerts contains {"message": msg} if {
	input.type == "open"
	input.open.write
	input.open.result >= 0
	path := open_path
	strings.any_prefix_match(path, lists.package_databases)
	not lists.package_managers[input.process.comm]
	msg := sprintf("%s (pid %d) wrote package database %s", [input.process.comm, input.process.pid, path])
}
