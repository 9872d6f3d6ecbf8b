# 4. Package managers changing a running container: by name and subcommand, run as an
# interpreter's module (`python3 -m pip install`, `python -m ensurepip`), or by their behaviour
# -- a write to the package database, whatever the program is called. Package queries (`dpkg -l`,
# `rpm -qa`, `apk info`: what is installed, so what there is to exploit) alert at low severity.
package palisade.rules.package_manager

import data.palisade.lib.exec_interpreters
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
		"exec": [
			# A package manager by name (the keys of lists.package_managers / package_queries).
			{"exec.filename": {"basename_in": lists.package_managers}},
			{"exec.argv.0": {"basename_in": lists.package_managers}},
			{"exec.filename": {"basename_in": lists.package_queries}},
			{"exec.argv.0": {"basename_in": lists.package_queries}},
			# A module run by an interpreter: `-m pip` or `-mpip`.
			{"exec.argv": {"any_in": module_arguments}},
		],
	},
}

# The arguments naming a package manager module: "pip" (after "-m") and "-mpip".
module_arguments := {arg |
	some module, _ in lists.package_manager_modules
	some arg in [module, concat("", ["-m", module])]
}

args := array.slice(input.exec.argv, 1, count(input.exec.argv))

alerts contains {"message": msg} if {
	input.type == "exec"
	some name in exec_names
	subcommands := lists.package_managers[name]
	some arg in args
	arg in subcommands
	msg := sprintf("package manager run: %s", [concat(" ", input.exec.argv)])
}

# The modules an interpreter is told to run (`-m pip` or `-mpip`), each with the arguments
# after it, as [module, arguments] pairs.
module_runs contains [module, rest] if {
	some i, arg in input.exec.argv
	arg == "-m"
	module := input.exec.argv[i + 1]
	rest := array.slice(input.exec.argv, i + 2, count(input.exec.argv))
}

module_runs contains [module, rest] if {
	some i, arg in input.exec.argv
	startswith(arg, "-m")
	arg != "-m"
	module := substring(arg, 2, -1)
	rest := array.slice(input.exec.argv, i + 1, count(input.exec.argv))
}

alerts contains {"message": msg} if {
	input.type == "exec"
	count(exec_interpreters) > 0
	some [module, rest] in module_runs
	subcommands := lists.package_manager_modules[module]
	module_changes_packages(subcommands, rest)
	msg := sprintf("package manager run by an interpreter: %s", [concat(" ", input.exec.argv)])
}

module_changes_packages(subcommands, _) if "*" in subcommands

module_changes_packages(subcommands, rest) if {
	some arg in rest
	arg in subcommands
}

alerts contains {"message": msg, "severity": "low"} if {
	input.type == "exec"
	some name in exec_names
	queries := lists.package_queries[name]
	some arg in args
	is_query(name, arg, queries)
	not changes_packages
	msg := sprintf("package query: %s", [concat(" ", input.exec.argv)])
}

alerts contains {"message": msg, "severity": "low"} if {
	input.type == "exec"
	count(exec_interpreters) > 0
	some [module, rest] in module_runs
	lists.package_manager_modules[module]
	queries := lists.package_queries[module]
	some arg in rest
	arg in queries
	msg := sprintf("package query by an interpreter: %s", [concat(" ", input.exec.argv)])
}

is_query(_, arg, queries) if arg in queries

# rpm's short options combine: -qa, -qil, -aq.
is_query("rpm", arg, _) if regex.match(`^-[a-zA-Z]*q[a-zA-Z]*$`, arg)

# A command that both changes and queries (`rpm -qa -e x`) is reported as the change only.
changes_packages if {
	some name in exec_names
	subcommands := lists.package_managers[name]
	some arg in args
	arg in subcommands
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
