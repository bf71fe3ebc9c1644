#!/usr/bin/env bash
# Once per AWS account and region, before the first `ray up cluster.yaml`: the two instance profiles
# (head, workers) and the cluster's security group. Idempotent: what exists is left as it is.
#
#   BUCKET=my-bucket ADMIN_CIDR=203.0.113.7/32 cluster/setup-aws.sh
#
# BUCKET: the bucket of SELFSUP_STORAGE in cluster.yaml. ADMIN_CIDR: where you run `ray up` / `ray
# submit` from, the only source that may reach the nodes' SSH port (your address, /32).
set -euo pipefail
: "${BUCKET:?set BUCKET to the bucket of SELFSUP_STORAGE}"
: "${ADMIN_CIDR:?set ADMIN_CIDR to the address you run ray up from, e.g. 203.0.113.7/32}"
REGION=${AWS_REGION:-us-east-1}
HERE=$(cd "$(dirname "$0")" && pwd)

for who in head worker; do
  role=selfsup-$who
  if ! aws iam get-role --role-name "$role" >/dev/null 2>&1; then
    aws iam create-role --role-name "$role" --assume-role-policy-document "file://$HERE/iam/ec2-trust.json" >/dev/null
  fi
  sed "s/YOUR-BUCKET/$BUCKET/g" "$HERE/iam/$who-policy.json" > "/tmp/selfsup-$who-policy.json"
  aws iam put-role-policy --role-name "$role" --policy-name "$role" \
    --policy-document "file:///tmp/selfsup-$who-policy.json"
  if ! aws iam get-instance-profile --instance-profile-name "$role" >/dev/null 2>&1; then
    aws iam create-instance-profile --instance-profile-name "$role" >/dev/null
    aws iam add-role-to-instance-profile --instance-profile-name "$role" --role-name "$role"
  fi
done

# The security group Ray finds by name (cluster.yaml: provider.security_group.GroupName). Ray adds
# its own rules (SSH from anywhere among them) only to a group that has none: this one has ours.
VPC=$(aws ec2 describe-vpcs --region "$REGION" --filters Name=isDefault,Values=true \
      --query 'Vpcs[0].VpcId' --output text)
SG=$(aws ec2 describe-security-groups --region "$REGION" --filters Name=group-name,Values=selfsup-cluster \
     Name=vpc-id,Values="$VPC" --query 'SecurityGroups[0].GroupId' --output text)
if [ "$SG" = "None" ]; then
  SG=$(aws ec2 create-security-group --region "$REGION" --vpc-id "$VPC" --group-name selfsup-cluster \
       --description "selfsup Ray cluster: SSH from the admin CIDR, everything else only between members" \
       --query GroupId --output text)
  # Ray (GCS 6379, object manager 8076, workers' ports), MLflow (5000): from members of this group only.
  aws ec2 authorize-security-group-ingress --region "$REGION" --group-id "$SG" \
    --ip-permissions "IpProtocol=-1,UserIdGroupPairs=[{GroupId=$SG}]" >/dev/null
  aws ec2 authorize-security-group-ingress --region "$REGION" --group-id "$SG" \
    --ip-permissions "IpProtocol=tcp,FromPort=22,ToPort=22,IpRanges=[{CidrIp=$ADMIN_CIDR}]" >/dev/null
fi
echo "selfsup: instance profiles selfsup-head, selfsup-worker and security group selfsup-cluster ($SG) ready"
