"""Apache TVM: the backend, RPC boards, MetaSchedule tuning and its database."""
